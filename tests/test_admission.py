"""Admission checks on their own (no engine): what is refused, with which code, and that nothing escapes."""

from __future__ import annotations

import io
import json
import struct
import tarfile
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from quiver.adapters.uploads import stage_upload
from quiver.adapters.validation import AdmissionError, BaseModelSpec, check_adapter_name, validate_adapter_dir

MAX_RANK = 16
LAYER = "base_model.model.model.layers.0.self_attn"


@pytest.fixture(scope="module")
def base(model_dir: Path) -> BaseModelSpec:
    return BaseModelSpec.from_folder(model_dir)


def lora_config(**overrides) -> dict:
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 8, "lora_alpha": 16, "bias": "none",
              "target_modules": ["q_proj", "v_proj"], "use_dora": False, "modules_to_save": None}
    return {**config, **overrides}


def lora_tensors(rank: int = 8, hidden: int = 576, kv: int = 192) -> dict[str, torch.Tensor]:
    return {
        f"{LAYER}.q_proj.lora_A.weight": torch.zeros(rank, hidden),
        f"{LAYER}.q_proj.lora_B.weight": torch.zeros(hidden, rank),
        f"{LAYER}.v_proj.lora_A.weight": torch.zeros(rank, hidden),
        f"{LAYER}.v_proj.lora_B.weight": torch.zeros(kv, rank),
    }


def write_adapter(folder: Path, config: dict | None = None, tensors: dict | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps(config if config is not None else lora_config()))
    save_file(tensors if tensors is not None else lora_tensors(), folder / "adapter_model.safetensors")
    return folder


def refusal_code(folder: Path, base: BaseModelSpec) -> str:
    with pytest.raises(AdmissionError) as refused:
        validate_adapter_dir(folder, base, MAX_RANK)
    return refused.value.code


def test_a_well_formed_adapter_passes(tmp_path: Path, base: BaseModelSpec) -> None:
    spec = validate_adapter_dir(write_adapter(tmp_path), base, MAX_RANK)
    assert (spec.rank, spec.modules, spec.target_modules) == (8, 2, ["q_proj", "v_proj"])


@pytest.mark.parametrize(
    ("config", "tensors", "code"),
    [
        (lora_config(peft_type="IA3"), None, "unsupported_adapter_type"),
        (lora_config(r=32), lora_tensors(rank=32), "rank_too_large"),
        (lora_config(rank_pattern={"q_proj": 64}), None, "rank_too_large"),
        (lora_config(use_dora=True), None, "dora_not_supported"),
        (lora_config(modules_to_save=["lm_head"]), None, "modules_to_save_not_supported"),
        (lora_config(bias="all"), None, "bias_not_supported"),
        (lora_config(task_type="SEQ_CLS"), None, "unsupported_task_type"),
        (lora_config(target_modules=["query_key_value"]), None, "unknown_target_module"),
        (lora_config(target_modules=r".*\.c_attn"), None, "unknown_target_module"),
        (lora_config(target_modules=None), None, "invalid_adapter_config"),
        (lora_config(r="8"), None, "invalid_adapter_config"),
        (None, lora_tensors(hidden=768, kv=256), "shape_mismatch"),  # an adapter for a wider model
        (None, lora_tensors(rank=4), "shape_mismatch"),  # tensors disagree with the config's rank
        (None, {f"{LAYER}.q_proj.lora_A.weight": torch.zeros(8, 576)}, "incomplete_adapter"),
        (None, {f"{LAYER}.q_proj.weight": torch.zeros(576, 576)}, "unsupported_adapter_tensor"),
        (None, {"base_model.model.model.layers.99.self_attn.q_proj.lora_A.weight": torch.zeros(8, 576)},
         "unknown_target_module"),
        (None, {k: v.to(torch.int32) for k, v in lora_tensors().items()}, "invalid_tensor_dtype"),
        (None, {}, "empty_adapter"),
    ],
)
def test_bad_adapters_are_refused_with_a_specific_code(tmp_path, base, config, tensors, code) -> None:
    assert refusal_code(write_adapter(tmp_path, config, tensors), base) == code


def test_corrupt_and_truncated_safetensors(tmp_path: Path, base: BaseModelSpec) -> None:
    folder = write_adapter(tmp_path)
    weights = folder / "adapter_model.safetensors"
    whole = weights.read_bytes()
    weights.write_bytes(whole[:-100])
    assert refusal_code(folder, base) == "invalid_safetensors"
    weights.write_bytes(struct.pack("<Q", 10**12) + whole[8:])
    assert refusal_code(folder, base) == "invalid_safetensors"
    weights.write_bytes(struct.pack("<Q", 4) + b"{{{{")
    assert refusal_code(folder, base) == "invalid_safetensors"


def test_missing_or_broken_config(tmp_path: Path, base: BaseModelSpec) -> None:
    folder = write_adapter(tmp_path)
    (folder / "adapter_config.json").write_text("{not json")
    assert refusal_code(folder, base) == "invalid_adapter_config"
    (folder / "adapter_config.json").unlink()
    assert refusal_code(folder, base) == "missing_adapter_config"


@pytest.mark.parametrize("name", ["..", "a/b", "/abs", "A", "-lead", "x" * 65, "nul\x00", "café", ""])
def test_bad_names(name: str) -> None:
    with pytest.raises(AdmissionError) as refused:
        check_adapter_name(name)
    assert refused.value.code == "invalid_adapter_name"


def _tar(members: list[tarfile.TarInfo], payloads: dict[str, bytes]) -> io.BytesIO:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as bundle:
        for info in members:
            data = payloads.get(info.name)
            if data is not None:
                info.size = len(data)
            bundle.addfile(info, io.BytesIO(data) if data is not None else None)
    buffer.seek(0)
    return buffer


def _member(name: str, kind: bytes = tarfile.REGTYPE, target: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info


@pytest.mark.parametrize(
    ("member", "code"),
    [
        (_member("../adapter_config.json"), "unsafe_file_name"),
        (_member("/etc/adapter_config.json"), "unsafe_file_name"),
        (_member("adapter_config.json", tarfile.SYMTYPE, "/etc/passwd"), "unsafe_archive"),
        (_member("adapter_config.json", tarfile.LNKTYPE, "/etc/passwd"), "unsafe_archive"),
        (_member("dev", tarfile.CHRTYPE), "unsafe_archive"),
        (_member("adapter_model.bin"), "pickle_not_allowed"),
    ],
)
def test_unsafe_tar_members(tmp_path: Path, member: tarfile.TarInfo, code: str) -> None:
    archive = _tar([member], {member.name: b"{}"} if member.isfile() else {})
    with pytest.raises(AdmissionError) as refused:
        stage_upload([("adapter.tar.gz", archive)], tmp_path, max_bytes=10**6)
    assert refused.value.code == code
    assert list(tmp_path.iterdir()) == []


def test_zip_slip_and_zip_symlink(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as bundle:
        bundle.writestr("../../evil/adapter_config.json", "{}")
    buffer.seek(0)
    with pytest.raises(AdmissionError) as refused:
        stage_upload([("a.zip", buffer)], tmp_path, max_bytes=10**6)
    assert refused.value.code == "unsafe_file_name"

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as bundle:
        link = zipfile.ZipInfo("adapter_config.json")
        link.external_attr = (0o120777 << 16)
        bundle.writestr(link, "/etc/passwd")
    buffer.seek(0)
    with pytest.raises(AdmissionError) as refused:
        stage_upload([("a.zip", buffer)], tmp_path, max_bytes=10**6)
    assert refused.value.code == "unsafe_archive"


def test_decompression_bomb_is_stopped_at_the_budget(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as bundle:
        bundle.writestr("adapter_model.safetensors", b"\0" * (50 * 1024 * 1024))
    assert buffer.tell() < 1024 * 1024  # small on the wire
    buffer.seek(0)
    with pytest.raises(AdmissionError) as refused:
        stage_upload([("bomb.zip", buffer)], tmp_path, max_bytes=4 * 1024 * 1024)
    assert (refused.value.code, refused.value.status) == ("archive_too_large", 413)


def test_archives_with_a_top_folder_are_accepted(tmp_path: Path, base: BaseModelSpec) -> None:
    source = write_adapter(tmp_path / "src")
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as bundle:
        bundle.add(source, arcname="my-adapter")
    buffer.seek(0)
    staging = tmp_path / "staging"
    staging.mkdir()
    stage_upload([("my-adapter.tar.gz", buffer)], staging, max_bytes=10**7)
    assert sorted(p.name for p in staging.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert validate_adapter_dir(staging, base, MAX_RANK).rank == 8


def test_adapters_that_train_layers_the_engine_does_not_serve_are_refused(tmp_path: Path, model_dir: Path) -> None:
    """With lora_target_modules set, vLLM wraps only those layers and would silently drop an adapter's others:
    such an adapter is refused, naming the layers; one within them is admitted."""
    from quiver.settings import Settings

    served = Settings(lora_target_modules="q_proj, k_proj,v_proj o_proj,q_proj").lora_target_modules
    assert served == ["q_proj", "k_proj", "v_proj", "o_proj"]
    base = BaseModelSpec.from_folder(model_dir, served)
    assert validate_adapter_dir(write_adapter(tmp_path / "attention"), base, MAX_RANK).modules == 2
    mlp = {**lora_tensors(), "base_model.model.model.layers.3.mlp.down_proj.lora_A.weight": torch.zeros(8, 1536),
           "base_model.model.model.layers.3.mlp.down_proj.lora_B.weight": torch.zeros(576, 8)}
    folder = write_adapter(tmp_path / "mlp", lora_config(target_modules=["q_proj", "v_proj", "down_proj"]), mlp)
    assert validate_adapter_dir(folder, BaseModelSpec.from_folder(model_dir), MAX_RANK).modules == 3  # all served
    with pytest.raises(AdmissionError) as refused:
        validate_adapter_dir(folder, base, MAX_RANK)
    assert refused.value.code == "target_module_not_served" and "down_proj" in refused.value.message

    # A name that is no layer of the model stops the server at start, not every registration later.
    with pytest.raises(ValueError, match="qkv_proj.*not a linear layer.*q_proj"):
        BaseModelSpec.from_folder(model_dir, ["qkv_proj"])
    with pytest.raises(ValueError, match="not a module name"):
        Settings(lora_target_modules="q_proj;rm")
