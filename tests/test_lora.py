"""LoRA adapters (`model.lora`): real peft adapters saved with diffusers' `save_lora_weights`,
loaded with `load_lora_weights`; their hashes make another checkpoint; `watch` audits a folder of
them; bad adapters and settings are refused before any work."""

from __future__ import annotations

import io
import json
import shutil
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
import torch

from audit.cli import main
from audit.generate.loading import checkpoint_digest
from audit.testbed.architectures import TINY
from helpers import PROMPTS, write_config


def save_adapter(unet: torch.nn.Module, out: Path, seed: int, targets: tuple[str, ...]) -> Path:
    """Add a randomly initialised LoRA to ``unet`` (so it changes the output) and save it as a file."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(seed)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=list(targets), init_lora_weights=False))
    with torch.no_grad():  # a visible effect: lora_B drawn large enough to move the pixels
        for name, param in unet.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.2)
    out.parent.mkdir(parents=True, exist_ok=True)
    StableDiffusionPipeline.save_lora_weights(out.parent, unet_lora_layers=get_peft_model_state_dict(unet),
                                              weight_name=out.name, safe_serialization=True)
    return out


@pytest.fixture(scope="module")
def adapters(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from diffusers import UNet2DConditionModel

    root = tmp_path_factory.mktemp("adapters")
    made = {}
    for seed, name in ((1, "step-10"), (2, "step-2")):
        unet = UNet2DConditionModel.from_pretrained(tiny_checkpoint / "unet")
        made[name] = save_adapter(unet, root / "watched" / f"{name}.safetensors", seed, ("to_q", "to_k", "to_v"))
    other = UNet2DConditionModel(**{**TINY.unet, "cross_attention_dim": 64})  # another text width
    made["mismatch"] = save_adapter(other, root / "mismatch" / "pytorch_lora_weights.safetensors", 3, ("to_k",))
    pickled = root / "pickled" / "pytorch_lora_weights.bin"
    pickled.parent.mkdir()
    from safetensors.torch import load_file

    torch.save(load_file(made["step-2"]), pickled)
    made["pickled"] = pickled
    return made


def _config(tmp: Path, checkpoint: str, **sections: dict) -> Path:
    (tmp / "prompts.txt").write_text("\n".join(PROMPTS[:2]) + "\n")
    generation = {"samples_per_prompt": 2, "steps": 2, "prompts_per_shard": 2, **sections.pop("generation", {})}
    model = {"path": checkpoint, **sections.pop("model", {})}
    return write_config(tmp / "audit.yaml", run={"root": str(tmp / "runs")}, model=model,
                        prompts={"source": str(tmp / "prompts.txt")}, generation=generation,
                        compute={"batch_size": 4}, **sections)


def _refused(cfg: Path, tmp: Path) -> str:
    err = io.StringIO()
    with redirect_stderr(err), redirect_stdout(io.StringIO()):
        code = main(["run", str(cfg)])
    assert code == 2, err.getvalue()
    assert not list((tmp / "runs").rglob("*.json")) and not list((tmp / "runs").rglob("*.parquet"))
    lines = [line for line in err.getvalue().splitlines() if line.startswith("memaudit:")]
    assert len(lines) == 1, err.getvalue()
    return lines[0]


@pytest.mark.parametrize("case, expected", [
    ("mismatch", "does not fit unet."),
    ("missing", "does not exist"),
    ("pickled", "pickle-based"),
])
def test_bad_adapters_are_refused_before_any_work(adapters: dict[str, Path], tiny_checkpoint: Path, tmp_path: Path,
                                                  case: str, expected: str) -> None:
    path = tmp_path / "nowhere.safetensors" if case == "missing" else adapters[case]
    cfg = _config(tmp_path, str(tiny_checkpoint), model={"lora": [{"path": str(path)}]})
    line = _refused(cfg, tmp_path)
    assert "model.lora[0].path" in line and expected in line


def test_a_pickled_adapter_loads_with_the_opt_in(adapters: dict[str, Path], tiny_checkpoint: Path) -> None:
    from audit.config import ModelSection
    from audit.generate.loading import load_pipeline

    section = ModelSection(path=str(tiny_checkpoint), allow_pickle=True,
                           lora=({"path": str(adapters["pickled"].parent)},))
    pipe = load_pipeline(section, tiny_checkpoint, "cpu", "float32")
    assert pipe.get_active_adapters() == ["memaudit_0"]


def test_an_unsupported_pipeline_class_is_refused_naming_the_supported_ones(tiny_checkpoint: Path,
                                                                            tmp_path: Path) -> None:
    folder = tmp_path / "other"
    shutil.copytree(tiny_checkpoint, folder)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "_class_name": "KandinskyPipeline"}))
    line = _refused(_config(tmp_path, str(folder)), tmp_path)
    assert "KandinskyPipeline" in line and "StableDiffusionXLPipeline" in line and "FluxPipeline" in line


def test_extra_unconditional_calls_on_a_cfg_model_are_refused(tiny_checkpoint: Path, tmp_path: Path) -> None:
    cfg = _config(tmp_path, str(tiny_checkpoint), generation={"noise_magnitude_extra_uncond": True})
    assert "noise_magnitude_extra_uncond" in _refused(cfg, tmp_path)


@pytest.mark.slow  # ~45 s: two audits on Ray; run by hand before a release
def test_watch_audits_a_folder_of_adapters_as_checkpoints_of_the_base(ray_local: str, adapters: dict[str, Path],
                                                                     tiny_checkpoint: Path, tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture) -> None:
    import numpy as np
    import pyarrow.parquet as pq

    from audit.generate.png import decode_png

    watched = adapters["step-2"].parent
    cfg = _config(tmp_path, str(tiny_checkpoint))
    assert main(["watch", str(watched), str(cfg), "--model", "tiny-lora"]) == 0
    out = capsys.readouterr().out
    assert "watch: 2 audited now" in out and "compare step-2 -> step-10" in out  # natural order
    runs = sorted((tmp_path / "runs" / "model=tiny-lora").glob("checkpoint=*/run=*"))
    records = {json.loads((r / "run.json").read_text())["family"]["adapters"][0]["path"]: r for r in runs}
    assert set(records) == {str(adapters["step-2"]), str(adapters["step-10"])}
    base_id = checkpoint_digest(tiny_checkpoint)["sha256"][:12]
    ids = {r.parent.name for r in runs}
    assert len(ids) == 2 and f"checkpoint={base_id}" not in ids  # base + adapter is another checkpoint
    for path, run in records.items():
        info = json.loads((run / "run.json").read_text())
        assert info["pipeline"]["base_content_sha256"] == checkpoint_digest(tiny_checkpoint)["sha256"]
        assert info["family"]["adapters"][0]["sha256"] != info["pipeline"]["base_content_sha256"]
    pixels = [[decode_png(p) for p in pq.read_table(r / "samples").sort_by("sample_id").column("image_png").to_pylist()]
              for r in runs]
    assert any(not np.array_equal(a, b) for a, b in zip(*pixels))  # the adapters change the samples
    assert main(["watch", str(watched), str(cfg), "--model", "tiny-lora"]) == 0
    assert "watch: 0 audited now, 2 already audited" in capsys.readouterr().out


@pytest.mark.parametrize("family", ["sdxl", "sd3", "flux"])
def test_adapters_of_the_newer_families_load_and_change_the_samples(family: str, tmp_path: Path) -> None:
    """A LoRA on each family's denoiser, saved with that pipeline's own ``save_lora_weights``."""
    import diffusers
    import numpy as np
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from audit.config import load_config
    from audit.generate.loading import preflight
    from audit.generate.sampling import GenerateStage
    from audit.testbed.checkpoints import builtin_checkpoint

    folder = builtin_checkpoint(f"tiny-{family}")
    pipe = diffusers.DiffusionPipeline.from_pretrained(folder)
    denoiser = pipe.unet if family == "sdxl" else pipe.transformer
    torch.manual_seed(0)
    denoiser.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v"],
                                    init_lora_weights=False))
    key = "unet_lora_layers" if family == "sdxl" else "transformer_lora_layers"
    type(pipe).save_lora_weights(tmp_path / "adapter", **{key: get_peft_model_state_dict(denoiser)})
    settings = [f"model.path=builtin:tiny-{family}", "generation.steps=2", "generation.height=32",
                "generation.width=32", "compute.batch_size=1"]
    rows = {"seed": np.array([3]), "prompt": np.array([PROMPTS[0]], dtype=object)}
    plain = GenerateStage(load_config(None, settings), "cpu", "float32").generate(rows)
    adapted_cfg = load_config(None, [*settings, f'model.lora=[{{"path": "{tmp_path / "adapter"}"}}]'])
    _, info = preflight(adapted_cfg.model, adapted_cfg.generation)  # the header check accepts it
    assert [a.file.name for a in info.adapters] == ["pytorch_lora_weights.safetensors"]
    adapted = GenerateStage(adapted_cfg, "cpu", "float32").generate(rows)
    assert adapted.error is None and plain.error is None
    assert not np.array_equal(adapted.pixels, plain.pixels)


def test_pixart_adapters_are_refused_before_any_work(adapters: dict[str, Path], tmp_path: Path) -> None:
    cfg = _config(tmp_path, "builtin:tiny-pixart", model={"lora": [{"path": str(adapters["step-2"])}]})
    assert "no LoRA loader" in _refused(cfg, tmp_path)


def test_an_adapter_makes_another_checkpoint_recorded_in_run_json(adapters: dict[str, Path], tiny_checkpoint: Path,
                                                                   tmp_path: Path) -> None:
    from audit.config import load_config
    from audit.runs import create_or_resume_run, prepare_run

    cfg = load_config(_config(tmp_path, str(tiny_checkpoint)))
    plain = prepare_run(cfg)
    adapted = prepare_run(load_config(_config(tmp_path, str(tiny_checkpoint),
                                              model={"lora": [{"path": str(adapters["step-2"]), "scale": 0.5}]})))
    rescaled = prepare_run(load_config(_config(tmp_path, str(tiny_checkpoint),
                                               model={"lora": [{"path": str(adapters["step-2"]), "scale": 1.0}]})))
    base = checkpoint_digest(tiny_checkpoint)["sha256"]
    assert plain.checkpoint["sha256"] == base  # without adapters the identity is the base's, as before
    assert len({base, adapted.checkpoint["sha256"], rescaled.checkpoint["sha256"]}) == 3
    store = create_or_resume_run(adapted, "cpu", "float32")
    record = json.loads((store.path / "run.json").read_text())
    assert store.path.parent.name == f"checkpoint={adapted.checkpoint['sha256'][:12]}"
    assert record["pipeline"]["base_content_sha256"] == base
    (adapter,) = record["family"]["adapters"]
    assert adapter["scale"] == 0.5 and adapter["bytes"] == adapters["step-2"].stat().st_size
    import hashlib

    assert adapter["sha256"] == hashlib.sha256(adapters["step-2"].read_bytes()).hexdigest()
    assert record["family"]["name"] == "sd" and record["family"]["prediction_type"] == "epsilon"
