"""Second stage: LLM reranking of the retriever's candidates.

labels.py  candidate label schemes (letters, numbers, custom) and their token ids at the answer position
prompts.py the one prompt format for training and inference (PromptStyle, build_prompt, build_training_text)
models.py  model/tokenizer sources: tiny-qwen2 and smollm2-135m-instruct offline, or any HF model
"""
