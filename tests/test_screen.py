"""The screen's pure parts (no Ray): signals, scores, escalation decisions, the screen section
of the config and the refusals made before any work (docs/screening.md)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from audit.cli import main
from audit.config import load_config
from audit.errors import ConfigError, InputError
from audit.generate.families import FAMILIES
from audit.screen import signals
from audit.screen.escalate import decide, robust_z, screen_scores, top_count
from audit.screen.run_screen import check_screen
from helpers import write_config


def test_noise_magnitude_is_the_norm_of_the_guidance_vector() -> None:
    uncond = torch.zeros(2, 4, 3, 3)
    cond = torch.zeros(2, 4, 3, 3)
    cond[0, 0, 0, 0], cond[1, :, 1, 1] = 3.0, 2.0
    assert signals.noise_magnitude(uncond, cond).tolist() == pytest.approx([3.0, 4.0])


def test_alignment_is_the_channel_cosine_between_the_unconditional_prediction_and_the_guidance() -> None:
    uncond = torch.zeros(1, 2, 1, 2)
    uncond[0, 0] = 1.0  # (1, 0) at both positions
    cond = uncond.clone()
    cond[0, 0, 0, 0] = 2.0  # guidance (1, 0): cosine 1 at position 0
    cond[0, 1, 0, 1] = 1.0  # guidance (0, 1): cosine 0 at position 1
    assert signals.alignment(uncond, cond).item() == pytest.approx(0.5)
    tokens = uncond.flatten(2).transpose(1, 2)  # [B, N, C]: channels last
    assert signals.alignment(tokens, cond.flatten(2).transpose(1, 2)).item() == pytest.approx(0.5)


def test_robust_z_ignores_outliers_and_keeps_nan() -> None:
    values = np.array([1.0, 2.0, 3.0, 4.0, 5.0, 1000.0, np.nan])
    z = robust_z(values)
    # median 3.5 and MAD 1.5 of the finite values: the outlier moves neither
    assert z[2] == pytest.approx((3.0 - 3.5) / (1.4826 * 1.5))
    assert abs(z[0]) < 2 and z[5] > 100 and np.isnan(z[6])
    flat = robust_z(np.array([1.0, 1.0, 1.0, 1.0, 5.0]))  # MAD 0: falls back, never divides by 0
    assert np.isfinite(flat).all() and flat[4] > 0


def test_screen_score_is_the_mean_of_the_oriented_z_scores() -> None:
    rng = np.random.default_rng(0)
    noise, align = rng.lognormal(0, 0.2, 50), rng.normal(0, 0.01, 50)
    noise[7], align[7] = noise.max() * 3, align.max() + 0.1
    score, z_noise, z_align, z_update = screen_scores(noise, align)
    assert np.allclose(score, (z_noise + z_align) / 2) and np.isnan(z_update).all()
    assert int(np.argmax(score)) == 7
    update = rng.lognormal(0, 0.1, 50)
    update[7] = update.max() * 2
    score, z_noise, z_align, z_update = screen_scores(noise, align, update)  # screen.steps > 1: a third signal
    assert np.allclose(score, (z_noise + z_align + z_update) / 3) and z_update[7] == z_update.max()


def _ids(n: int) -> list[str]:
    return [f"p{i:03d}" for i in range(n)]


def test_threshold_top_and_unmeasured_prompts_escalate_with_their_reasons() -> None:
    n = 40
    rng = np.random.default_rng(1)
    noise, align = rng.lognormal(0, 0.1, n), rng.normal(0, 0.01, n)
    noise[3], align[3] = 10.0, 0.5  # far above the rest
    noise[5] = np.nan  # the screen failed for this prompt
    table = decide(_ids(n), noise, align, threshold=2.0, top=2)
    rows = {r["prompt_id"]: r for r in table.to_pylist()}
    assert rows["p003"]["escalation"] == "threshold+top" and rows["p003"]["rank"] == 0
    assert rows["p005"]["escalated"] and rows["p005"]["escalation"] == "screen error" and rows["p005"]["rank"] == n - 1
    second = next(r for r in rows.values() if r["rank"] == 1)
    assert "top" in second["escalation"]
    passing = {p for p, r in rows.items() if r["screen_score"] is not None and r["screen_score"] >= 2.0}
    escalated = {p for p, r in rows.items() if r["escalated"]}
    assert escalated == passing | {"p005", second["prompt_id"]}
    assert sorted(r["rank"] for r in rows.values()) == list(range(n))
    assert decide(_ids(n), noise, align, 2.0, 2).equals(table)  # deterministic


def test_a_fraction_rounds_up_and_too_few_prompts_escalate_all() -> None:
    assert top_count(0.1, 25) == 3 and top_count(1.0, 25) == 25 and top_count(30, 25) == 25 and top_count(None, 9) == 0
    table = decide(_ids(5), np.ones(5), np.zeros(5), threshold=2.0, top=None)
    assert all(table.column("escalated").to_pylist())
    assert set(table.column("escalation").to_pylist()) == {"too few prompts"}


@pytest.mark.parametrize(("key", "value", "expected"), [
    ("threshold", "0", "finite number above 0"), ("threshold", ".inf", "finite number above 0"),
    ("top", "0", "count must be >= 1"), ("top", "1.5", "fraction must be in (0, 1]"),
    ("top", "true", "not a boolean"), ("seeds", "0", "greater than 0"),
])
def test_bad_screen_settings_name_the_key(key: str, value: str, expected: str) -> None:
    with pytest.raises(ConfigError) as raised:
        load_config(None, [f"screen.{key}={value}"])
    assert f"screen.{key}: " in str(raised.value) and expected in str(raised.value)


def test_a_bare_screen_section_turns_screening_on(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("screen:\n")
    assert load_config(path).screen is not None and load_config(path).screen.seeds == 4
    assert load_config(None).screen is None


def test_the_screen_joins_the_run_identity_only_when_present() -> None:
    plain = load_config(None).result_identity("c", "p", "cpu", "float32")
    assert "screen" not in plain
    screened = load_config(None, ["screen.top=0.5"]).result_identity("c", "p", "cpu", "float32")
    assert screened["screen"]["top"] == 0.5 and {k: v for k, v in screened.items() if k != "screen"} == plain


def test_a_screen_without_an_unconditional_prediction_is_refused() -> None:
    sd, flux = FAMILIES["StableDiffusionPipeline"], FAMILIES["FluxPipeline"]
    screen = load_config(None, ["screen.seeds=2"]).screen
    assert screen is not None
    check_screen(screen, sd, load_config(None).generation, 10)
    with pytest.raises(InputError, match="guidance-distilled"):
        check_screen(screen, flux, load_config(None).generation, 10)
    with pytest.raises(InputError, match="guidance_scale > 1"):
        check_screen(screen, sd, load_config(None, ["generation.guidance_scale=1"]).generation, 10)


def test_cli_refuses_a_screen_without_guidance_before_any_work(tmp_path: Path, tiny_checkpoint: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path / "c.yaml", run={"root": str(tmp_path / "runs")}, model={"path": str(tiny_checkpoint)},
                          generation={"guidance_scale": 1.0, "steps": 2}, screen={"seeds": 2})
    assert main(["-q", "screen", str(config)]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("memaudit")]
    assert len(errors) == 1 and "generation.guidance_scale" in errors[0]
    assert not (tmp_path / "runs").exists()


def test_more_screen_steps_than_sampler_steps_are_refused() -> None:
    cfg = load_config(None, ["screen.steps=30", "generation.steps=20"])
    assert cfg.screen is not None
    with pytest.raises(InputError, match=r"screen.steps \(30\) is more than generation.steps \(20\)"):
        check_screen(cfg.screen, FAMILIES["StableDiffusionPipeline"], cfg.generation, 10)


def test_top_above_the_prompt_count_warns(caplog: pytest.LogCaptureFixture) -> None:
    screen = load_config(None, ["screen.top=500"]).screen
    assert screen is not None
    check_screen(screen, FAMILIES["StableDiffusionPipeline"], load_config(None).generation, 40)
    assert "every prompt is escalated" in caplog.text


def test_rounds_double_up_to_the_maximum_and_name_their_shards() -> None:
    from audit.plan import round_ends, round_shard_name

    assert round_ends(4, None) == [4] and round_ends(4, 4) == [4]
    assert round_ends(4, 32) == [4, 8, 16, 32] and round_ends(4, 12) == [4, 8, 12]
    assert round_shard_name("shard-00003", 0) == "shard-00003" and round_shard_name("shard-00003", 2) == "shard-00003-r2"


def test_a_rounds_sample_range_keeps_each_samples_id_and_seed() -> None:
    from audit.plan import ShardSpec, shard_samples

    spec = ShardSpec(0, "shard-00000", ("aa", "bb"), ("a", "b"))
    whole = shard_samples(spec, 8, run_seed=3)
    later = ShardSpec(0, "shard-00000-r1", ("bb",), ("b",), first_sample=4, end_sample=8).sample_rows(4, run_seed=3)
    expected = {sid: seed for sid, seed in zip(whole["sample_id"], whole["seed"]) if sid.startswith("bb-")}
    assert list(later["sample_idx"]) == [4, 5, 6, 7]
    assert {sid: seed for sid, seed in zip(later["sample_id"], later["seed"])} == \
        {sid: seed for sid, seed in expected.items() if int(sid.split("-")[1]) >= 4}


def _scores(**row: object) -> dict:
    return {"flagged": False, "n_matching": 0, "n_retrieved": 0, "n_template": 0, "n_low_information": 0,
            "clique_size": 1, "clique_min": 3, "p_value": 1.0, "n_samples": 4} | row


@pytest.mark.parametrize(("row", "decision"), [
    (_scores(flagged=True, p_value=1e-9, n_matching=3), "memorized"),
    (_scores(n_matching=1, p_value=0.02), "continue"),  # a verified copy the flag test does not accept yet
    (_scores(n_template=1, n_samples=32), "continue"),
    (_scores(n_samples=8), "continue"),  # no evidence, too few samples
    (_scores(n_samples=16, n_retrieved=3, clique_size=2), "clean"),  # other images' copies are not its evidence
])
def test_each_round_decides_by_the_documented_rule(row: dict, decision: str) -> None:
    from audit.detect.rounds import decide

    assert decide(row, clean_after=16)[0] == decision


def test_max_samples_below_the_first_round_is_refused() -> None:
    with pytest.raises(ConfigError, match="max_samples_per_prompt .* is below samples_per_prompt"):
        load_config(None, ["generation.max_samples_per_prompt=2"])


def test_more_screen_steps_keep_the_first_steps_signals(tiny_checkpoint: Path) -> None:
    """screen.steps > 1 lets the sampler go on for the latent updates: the first informative
    call's magnitude and alignment stay what they are with one step, read once."""
    from audit import ids
    from audit.screen.screen_step import ScreenStage

    prompts = ["a red car", "a blue boat", "a green tree"]
    batch = {"prompt_id": np.array([ids.prompt_id(p) for p in prompts], object), "prompt": np.array(prompts, object),
             "seed": np.array([1, 2, 3], np.int64)}
    one, three = (ScreenStage(load_config(None, [f"model.path={tiny_checkpoint}", "generation.steps=4",
                                                 "compute.batch_size=4", f"screen.steps={k}"]), "cpu", "float32")
                  for k in (1, 3))
    a, b = one(batch), three(batch)
    assert np.array_equal(a["noise_magnitude"], b["noise_magnitude"]) and np.array_equal(a["alignment"], b["alignment"])
    assert np.isnan(a["latent_update"]).all() and (b["latent_update"] > 0).all()
    assert (one.denoiser_calls, three.denoiser_calls) == (2, 4)  # + 2 sampler steps' calls, no second low-noise call
