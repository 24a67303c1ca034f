"""Local HF model folders for the real backend: the toy teacher and student, exported once from their config.

A toy utility, not a role: backends/vllm_fsdp/parts.py calls it when no model folder is configured.

vLLM and the FSDP2 learner load models from a local HF folder (`config.json` + `model.safetensors`); the
project never downloads one. For a self-contained run, `export_toy_models(toy_cfg)` writes the cached toy
teacher and warmed-up student (backends/toy_models.py, built from a `GPT2Config` and trained here) with
`save_pretrained`, under `<model cache>/hf/<kind>-<cache key>/`, and returns the two paths. The folders have
no tokenizer: the sort task speaks token ids, and the vLLM engines run with `skip_tokenizer_init=True`.
A folder whose `config.json` exists is complete (it is written by an atomic rename of the whole folder).

    python -m backends.toy_export                      # prints the two folders for the default ToyConfig
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from backends.toy import ToyConfig, build_models
from backends.toy_models import cache_root


def export_model(model, folder: Path) -> Path:
    """save_pretrained(safetensors) into `folder` atomically; an existing complete folder is kept as is."""
    if (folder / "config.json").exists():
        return folder
    tmp = folder.with_name(f"{folder.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    folder.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(tmp, folder)
    except OSError:                                       # another process exported it first: keep theirs
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def export_toy_models(toy: ToyConfig) -> tuple[Path, Path]:
    """(teacher folder, student folder) of this ToyConfig's cached models, trained first if needed."""
    _, teacher, student, info = build_models(toy)
    root = cache_root(toy.cache_dir) / "hf"
    return tuple(export_model(m, root / f"{kind}-{info[kind]['key']}")
                 for kind, m in (("teacher", teacher), ("student", student)))


if __name__ == "__main__":
    t, s = export_toy_models(ToyConfig())
    print(json.dumps({"teacher_path": str(t), "student_path": str(s)}))
