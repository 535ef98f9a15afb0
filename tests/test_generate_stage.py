"""The Ray-free generation stage on the tiny real checkpoint."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from audit import ids
from audit.config import AuditConfig, load_config
from audit.generate.png import decode_png
from audit.generate.sampling import GenerateStage
from audit.plan import ShardSpec, shard_samples
from helpers import PROMPTS

STEPS = 6


def _cfg(checkpoint: Path, *overrides: str) -> AuditConfig:
    return load_config(None, [f"model.path={checkpoint}", f"generation.steps={STEPS}", *overrides])


def _rows(n_prompts: int = 2, samples: int = 4, seed: int = 0) -> dict[str, np.ndarray]:
    prompts = tuple(PROMPTS[:n_prompts])
    shard = ShardSpec(0, "shard-00000", tuple(ids.prompt_id(p) for p in prompts), prompts)
    return shard_samples(shard, samples, seed)


@pytest.fixture(scope="module")
def stage(tiny_checkpoint: Path) -> GenerateStage:
    return GenerateStage(_cfg(tiny_checkpoint), "cpu", "float32")


def test_outputs_one_lossless_png_per_row(stage: GenerateStage) -> None:
    rows = _rows()
    raw = stage.generate(rows)
    out = stage.encode(rows, raw)
    assert list(out["sample_id"]) == list(rows["sample_id"])
    assert set(out["status"]) == {"ok"} and set(out["error"]) == {None}
    for i, png in enumerate(out["image_png"]):
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
        assert np.array_equal(decode_png(png), raw.pixels[i])
    assert list(out["width"]) == [32] * 8 and list(out["height"]) == [32] * 8
    assert decode_png(out["thumb_png"][0]).shape == (32, 32, 3)  # never upscaled
    assert np.isfinite(out["noise_magnitude"]).all() and (out["noise_magnitude"] > 0).all()
    assert len({bytes(p) for p in out["image_png"]}) == 8  # every seed gives its own image


def test_pixels_do_not_depend_on_position_or_neighbors(stage: GenerateStage) -> None:
    """With one batch size, a sample's bytes are the same alone, first, last or among others."""
    rows = _rows(n_prompts=2, samples=4)
    together = stage(rows)
    alone = [stage({k: v[i : i + 1] for k, v in rows.items()}) for i in range(8)]
    reverse = stage({k: v[::-1] for k, v in rows.items()})
    for i in range(8):
        assert alone[i]["sample_id"][0] == together["sample_id"][i]
        assert alone[i]["image_png"][0] == together["image_png"][i]
        assert reverse["image_png"][7 - i] == together["image_png"][i]
        assert alone[i]["noise_magnitude"][0] == together["noise_magnitude"][i]


def test_batch_size_1_and_8_agree_to_the_last_rounding(tiny_checkpoint: Path, stage: GenerateStage) -> None:
    """Seeds and initial noise never depend on batching. Kernels are picked by batch shape
    (oneDNN, cuBLAS), so another batch size may round differently in the last float bit, which
    moves a few 8-bit pixel values by one level; this bounds that effect."""
    rows = _rows(n_prompts=2, samples=4)
    single = GenerateStage(_cfg(tiny_checkpoint, "compute.batch_size=1"), "cpu", "float32")
    a = stage.generate(rows).pixels.astype(int)
    b = np.concatenate([single.generate({k: v[i : i + 1] for k, v in rows.items()}).pixels for i in range(8)]).astype(int)
    diff = np.abs(a - b)
    print(f"batch 1 vs 8: max |diff| {diff.max()} levels, {np.mean(diff > 0):.2e} of values differ")
    assert diff.max() <= 1
    assert np.mean(diff > 0) < 1e-3


def test_noise_magnitude_is_the_cfg_text_difference_without_extra_calls(stage: GenerateStage) -> None:
    """Recompute ||eps(x_T, c) - eps(x_T, ∅)|| at the first step with two separate UNet calls."""
    from diffusers.utils.torch_utils import randn_tensor

    rows = _rows(n_prompts=1, samples=2)
    pipe = stage.pipe
    calls: list[int] = []
    handle = pipe.unet.register_forward_hook(lambda *a: calls.append(1))
    try:
        recorded = stage(rows)["noise_magnitude"]
        in_stage = len(calls)
        pipe(["x"] * 8, num_inference_steps=STEPS, output_type="pt")
        plain = len(calls) - in_stage
    finally:
        handle.remove()
    assert in_stage == plain  # recording adds no UNet call (PNDM makes steps + 1 calls)
    with torch.inference_mode():
        cond, uncond = pipe.encode_prompt(str(rows["prompt"][0]), "cpu", 1, True, None)
        pipe.scheduler.set_timesteps(STEPS)
        t0 = pipe.scheduler.timesteps[0]
        for i, seed in enumerate(rows["seed"]):
            latents = randn_tensor((1, 4, 16, 16), generator=torch.Generator().manual_seed(int(seed)), dtype=torch.float32)
            x = pipe.scheduler.scale_model_input(latents * pipe.scheduler.init_noise_sigma, t0)
            eps_c = pipe.unet(x, t0, encoder_hidden_states=cond).sample
            eps_u = pipe.unet(x, t0, encoder_hidden_states=uncond).sample
            expected = (eps_c - eps_u).flatten().norm().item()
            assert recorded[i] == pytest.approx(expected, rel=1e-4)


def test_noise_magnitude_averages_first_k_steps(tiny_checkpoint: Path) -> None:
    rows = _rows(n_prompts=1, samples=2)
    k1 = GenerateStage(_cfg(tiny_checkpoint), "cpu", "float32")(rows)
    k3 = GenerateStage(_cfg(tiny_checkpoint, "generation.noise_magnitude_steps=3"), "cpu", "float32")(rows)
    assert list(k1["image_png"]) == list(k3["image_png"])  # recording never changes the pixels
    assert not np.allclose(k1["noise_magnitude"], k3["noise_magnitude"])


def test_without_cfg_magnitude_is_nan(tiny_checkpoint: Path) -> None:
    out = GenerateStage(_cfg(tiny_checkpoint, "generation.guidance_scale=1.0", "generation.thumbnail_size=0"), "cpu", "float32")(_rows(1, 2))
    assert np.isnan(out["noise_magnitude"]).all()
    assert set(out["status"]) == {"ok"} and list(out["thumb_png"]) == [None, None]


def test_scheduler_from_config(tiny_checkpoint: Path, stage: GenerateStage) -> None:
    ddim = GenerateStage(_cfg(tiny_checkpoint, "model.scheduler=DDIMScheduler"), "cpu", "float32")
    assert type(ddim.pipe.scheduler).__name__ == "DDIMScheduler"
    rows = _rows(1, 2)
    assert list(ddim(rows)["image_png"]) == list(ddim(rows)["image_png"])
    assert list(ddim(rows)["image_png"]) != list(stage(rows)["image_png"])


def test_overflowing_model_gives_error_rows_not_a_crash(tiny_checkpoint: Path) -> None:
    broken = GenerateStage(_cfg(tiny_checkpoint), "cpu", "float32")
    with torch.no_grad():
        broken.pipe.vae.decoder.conv_out.weight.fill_(float("inf"))
    rows = _rows(1, 3)
    out = broken(rows)
    assert list(out["sample_id"]) == list(rows["sample_id"])
    assert set(out["status"]) == {"error"}
    assert all("non-finite pixels" in e for e in out["error"])
    assert list(out["image_png"]) == [None] * 3


def test_failing_batch_becomes_error_rows(tiny_checkpoint: Path) -> None:
    failing = GenerateStage(_cfg(tiny_checkpoint), "cpu", "float32")
    failing.pipe.unet.register_forward_pre_hook(lambda *a: (_ for _ in ()).throw(RuntimeError("CUDA error: device lost")))
    out = failing(_rows(1, 2))
    assert set(out["status"]) == {"error"}
    assert list(out["error"]) == ["RuntimeError: CUDA error: device lost"] * 2
    assert np.isnan(out["noise_magnitude"]).all()


@pytest.mark.parametrize("in_cpu_phase", [False, True], ids=["generating-thread", "cpu-phase"])
def test_embedding_while_generating_writes_what_embedding_afterwards_writes(
        tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, in_cpu_phase: bool) -> None:
    """The generation worker's embeddings (from pixels, groups straddling generation batches, a
    failed batch in the middle) equal, bit for bit, those embedded later from the shard's PNGs —
    embedded on the generating thread (a CPU embedder) or in the CPU phase (an accelerator's)."""
    import pyarrow.parquet as pq

    from audit.embed import samples as embedded
    from audit.embed.embedding import EmbedStage
    from audit.generate import generate_step as generating
    from audit.generate.generate_step import generate_shard
    from audit.store import RunStore

    assert not generating._embeds_in_cpu_phase(EmbedStage(load_config(None, []).embedding, "cpu"))
    monkeypatch.setattr(generating, "_embeds_in_cpu_phase", lambda embed: in_cpu_phase)

    cfg = _cfg(tiny_checkpoint, "compute.batch_size=4", "embedding.batch_size=3", "generation.samples_per_prompt=4")
    generator = GenerateStage(cfg, "cpu", "float32")
    calls = [0]

    def fail_second_batch(*_: object) -> None:
        calls[0] += 1
        if calls[0] == STEPS + 1:  # the second batch's first UNet call
            raise RuntimeError("device lost")

    generator.pipe.unet.register_forward_pre_hook(fail_second_batch)
    embed = EmbedStage(cfg.embedding, "cpu")
    prompts = tuple(PROMPTS[:3])
    shard = ShardSpec(0, "shard-00000", tuple(ids.prompt_id(p) for p in prompts), prompts)
    store = RunStore(tmp_path / "run")

    marker = generate_shard(generator, store, cfg, shard, embed)
    assert marker["embedded_while_generating"] == embed.model_id and marker["status_counts"] == {"ok": 8, "error": 4}
    written = store.read_marker(embedded.TABLE, shard.name)
    assert written["during"] == "generation" and written["rows"] == 12
    assert store.is_current(embedded.TABLE, shard.name, embedded.inputs(store, shard.name, embed.model_id))
    during = pq.read_table(store.shard_path(embedded.TABLE, shard.name))
    samples = pq.read_table(store.shard_path("samples", shard.name), columns=["sample_id", "status"])
    assert during.column("sample_id").equals(samples.column("sample_id"))
    assert during.column("status").to_pylist() == samples.column("status").to_pylist()
    failed = [e for e in during.column("error").to_pylist() if e]
    assert failed == [embedded.NOT_GENERATED] * 4

    embedded.embed_shard(embed, store, shard.name)
    afterwards = pq.read_table(store.shard_path(embedded.TABLE, shard.name))
    assert store.read_marker(embedded.TABLE, shard.name).get("during") is None
    assert afterwards.equals(during)
    ok = [e for e, state in zip(afterwards.column("embedding").to_pylist(), afterwards.column("status").to_pylist())
          if state == "ok"]
    assert len(set(ok)) == 8 and all(any(e) for e in ok)  # distinct images, distinct non-zero rows


def test_an_embedding_failure_while_generating_keeps_the_generated_shard(tiny_checkpoint: Path, tmp_path: Path) -> None:
    from audit.embed import samples as embedded
    from audit.embed.embedding import EmbedStage
    from audit.generate.generate_step import generate_shard
    from audit.store import RunStore

    cfg = _cfg(tiny_checkpoint, "compute.batch_size=4", "embedding.batch_size=4")
    embed = EmbedStage(cfg.embedding, "cpu")
    calls = [0]
    forward = embed.embedder.forward

    def fail_second_forward(pixels: torch.Tensor) -> torch.Tensor:
        calls[0] += 1
        if calls[0] == 2:
            raise RuntimeError("CUDA out of memory in the embedding model")
        return forward(pixels)

    embed.embedder.forward = fail_second_forward
    prompts = tuple(PROMPTS[:3])
    shard = ShardSpec(0, "shard-00000", tuple(ids.prompt_id(p) for p in prompts), prompts)
    store = RunStore(tmp_path / "run")
    marker = generate_shard(GenerateStage(cfg, "cpu", "float32"), store, cfg, shard, embed)
    assert "embedded_while_generating" not in marker and marker["status_counts"] == {"ok": 12}
    assert store.is_complete("samples", shard.name)
    assert store.read_marker(embedded.TABLE, shard.name) is None
    assert not list((tmp_path / "run" / embedded.TABLE).glob("*.parquet*"))  # nothing partial left behind
    assert calls[0] == 2  # embedding stopped for this shard after the failure
