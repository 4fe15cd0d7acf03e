"""The GPU set (requirements-gpu.txt) stays in step with requirements.txt, and scripts/gpu_resolve.py
refuses the resolutions that would give a broken GPU environment. Offline: .ci/gpu_resolve runs pip."""
import importlib.util
import re

import pytest

from tests.helpers.scripts import REPO

spec = importlib.util.spec_from_file_location("gpu_resolve", REPO / "scripts" / "gpu_resolve.py")
gpu_resolve = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_resolve)


def test_gpu_set_is_in_step_with_the_cpu_set():
    cpu = gpu_resolve.read_requirements(REPO / "requirements.txt")
    gpu = gpu_resolve.read_requirements(REPO / "requirements-gpu.txt")
    gpu_resolve.check_in_step(cpu, gpu)
    # the CPU set's transformers and trl: unsloth, which capped them at 5.17 / 1.15, left the set (README, GPU)
    assert gpu["transformers"] == cpu["transformers"] == "==5.23.0" and gpu["trl"] == cpu["trl"] == "==1.16.0"
    assert not {"unsloth", "unsloth-zoo", "xformers", "torchvision"} & set(gpu)
    assert set(gpu) - set(cpu) == {"bitsandbytes"}  # the one CUDA-only package


def test_a_missing_or_different_pin_is_refused():
    cpu = {"peft": "==0.21.2", "pandas": ">=2.2,<3", "transformers": "==5.23.0"}
    with pytest.raises(gpu_resolve.Problem, match="peft is in requirements.txt but not in requirements-gpu.txt"):
        gpu_resolve.check_in_step(cpu, {"pandas": ">=2.2,<3", "transformers": "==5.17.0"})
    with pytest.raises(gpu_resolve.Problem, match="pandas is pinned >=2.2,<3 in requirements.txt but >=2.2"):
        gpu_resolve.check_in_step(cpu, {"peft": "==0.21.2", "pandas": ">=2.2", "transformers": "==5.23.0"})
    with pytest.raises(gpu_resolve.Problem, match="transformers is pinned ==5.23.0 in requirements.txt but ==5.17.0"):
        gpu_resolve.check_in_step(cpu, {"peft": "==0.21.2", "pandas": ">=2.2,<3", "transformers": "==5.17.0"})  # no exception left
    gpu_resolve.check_in_step(cpu, {"peft": "==0.21.2", "pandas": ">=2.2,<3", "transformers": "==5.23.0", "bitsandbytes": "==0.50.2"})


def _item(name, version, requires=(), url="https://files.example/x.whl"):
    return {"metadata": {"name": name, "version": version, "requires_dist": list(requires)}, "download_info": {"url": url}}


def test_report_must_hold_a_cuda_torch_and_the_pinned_versions():
    gpu = {"torch": "==2.13.0", "bitsandbytes": "==0.50.2", "pandas": ">=2.2,<3"}
    cuda_torch = _item("torch", "2.13.0", ['nvidia-cudnn-cu13==9.20.0.48; platform_system == "Linux"'])
    ok = {"install": [cuda_torch, _item("bitsandbytes", "0.50.2"), _item("pandas", "2.3.3")]}
    assert gpu_resolve.check_report(ok, gpu)["torch"] == "2.13.0"
    cpu_torch = {"install": [_item("torch", "2.13.0+cpu", url="file:///opt/wheels/torch.whl"), _item("bitsandbytes", "0.50.2")]}
    with pytest.raises(gpu_resolve.Problem, match=r"CPU-only torch \(2.13.0\+cpu"):
        gpu_resolve.check_report(cpu_torch, gpu)
    other = {"install": [cuda_torch, _item("bitsandbytes", "0.49.0")]}
    with pytest.raises(gpu_resolve.Problem, match="pip chose bitsandbytes 0.49.0 instead of requirements-gpu.txt's 0.50.2"):
        gpu_resolve.check_report(other, gpu)


def test_requirement_lines_are_parsed_with_comments_and_extras(tmp_path):
    f = tmp_path / "r.txt"
    f.write_text("# c\nTorch==2.13.0  # why\nunsloth_zoo==2026.10.9\nfoo[bar]>=1, <2\n\n")
    assert gpu_resolve.read_requirements(f) == {"torch": "==2.13.0", "unsloth-zoo": "==2026.10.9", "foo": ">=1,<2"}
    f.write_text("-r other.txt\n")
    with pytest.raises(gpu_resolve.Problem, match="line 1 is not a plain requirement"):
        gpu_resolve.read_requirements(f)


def test_readme_gpu_commands_run_from_the_gpu_venv():
    """.venv has the CPU torch: `.venv/bin/accelerate launch --multi_gpu` with device auto would train CPU
    processes over gloo without a word. Every accelerate command that is not the explicit CPU (gloo) one
    must call .venv-gpu's, and the README must not tell anyone to use unsloth."""
    readme = (REPO / "README.md").read_text()
    joined = readme.replace("\\\n", " ")  # a command with its continuation lines, as one line
    commands = re.findall(r"^\S*accelerate launch .*$", joined, flags=re.M)
    assert len(commands) >= 3
    for cmd in commands:
        on_cpu = "reranker.device=cpu" in cmd
        assert cmd.startswith(".venv/bin/accelerate " if on_cpu else ".venv-gpu/bin/accelerate "), cmd
    assert sum(not c.startswith(".venv/") for c in commands) >= 2  # the GPU ones exist
    assert "backend: unsloth" not in readme.replace("`reranker.backend: unsloth` is refused", "")
