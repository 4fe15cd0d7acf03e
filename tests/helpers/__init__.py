"""What the tests share: builders of tiny datasets, models, rows and runs, the script runner, the vLLM stub."""
