"""Bounded-memory calibration: Hessians collected block by block over several passes must be
the Hessians of one pass, bit for bit, and the sweep must prune the same from disk."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from whisper_obs_pruning.hessians.calibration import (
    calibrate_in_passes,
    hessian_nbytes,
    plan_passes,
)
from whisper_obs_pruning.hessians.collector import linear_layers
from whisper_obs_pruning.hessians.store import (
    ArtifactError,
    hessian_set_bytes,
    hessian_set_writer,
    read_manifest,
    reusable_hessians,
)
from whisper_obs_pruning.pipeline.calibrate import calibrate
from whisper_obs_pruning.pipeline.common import fingerprint, targets_for
from whisper_obs_pruning.pipeline.params import load_params
from whisper_obs_pruning.pruning import prune_layers
from whisper_obs_pruning.whisper.prompt import decoder_prompt_ids

REPO = Path(__file__).resolve().parents[1]
MiB = 2**20


def test_plan_passes_fills_blocks_in_order_within_the_budget():
    dims = {"a": 10, "b": 20, "c": 5, "d": 40, "e": 10}
    budget = 8 * (10 * 10 + 20 * 20)
    blocks = plan_passes(dims, budget)
    # a+b fill the budget; c would not fit beside them; d alone is over it; e not beside d
    assert blocks == [["a", "b"], ["c"], ["d"], ["e"]]
    for block in blocks:
        size = sum(hessian_nbytes(dims[n]) for n in block)
        assert len(block) == 1 or size <= budget
    assert plan_passes(dims, None) == [list(dims)]
    assert plan_passes(dims, 0) == [[n] for n in dims]
    assert plan_passes(dims, 8 * sum(dims.values()), diagonal=True) == [list(dims)]
    assert plan_passes({}, 100) == []


def _params(max_mb):
    return load_params(REPO / "params.yaml").updated(
        {
            "data.calibration.max_samples": 2,
            "model.device": "cpu",
            "calibrate.max_hessian_mb": max_mb,
        }
    )


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    """The same calibration written in one pass and in passes of at most 8 MiB."""
    d = tmp_path_factory.mktemp("passes")
    one = calibrate(_params(None), d / "one", progress=False)
    many = calibrate(_params(8), d / "many", progress=False)
    return {"one": (d / "one", one), "many": (d / "many", many)}


def test_passes_give_the_one_pass_hessians_bit_for_bit(sets):
    (one_dir, one), (many_dir, many) = sets["one"], sets["many"]
    assert one["passes"] == 1 and one["peak_accumulator_mb"] == one["hessians_mb"]
    assert many["passes"] > 4
    largest_mb = 1536 * 1536 * 8 / MiB  # fc2's input: alone in its pass, over the budget
    assert many["peak_accumulator_mb"] <= max(8, largest_mb) + 0.1
    assert many["peak_accumulator_mb"] < one["hessians_mb"] / 5
    m1, m2 = read_manifest(one_dir), read_manifest(many_dir)
    assert m1 == m2  # same files, sha256, shapes, sample counts, shared inputs and meta
    assert len({e["file"] for e in m1["layers"].values()}) == one["distinct_hessians"] == 42


def test_sweep_reads_hessians_per_layer_over_the_budget_and_prunes_the_same(sets, tiny):
    model, _ = tiny
    hdir, info = sets["one"]
    targets = targets_for(model, _params(None))
    manifest, held = reusable_hessians(
        hdir, model, targets, fingerprint(model), _params(None).calibrate.max_hessian_bytes
    )
    assert hessian_set_bytes(manifest) / MiB == pytest.approx(info["hessians_mb"], abs=0.1)
    q, k = "model.encoder.layers.0.self_attn.q_proj", "model.encoder.layers.0.self_attn.k_proj"
    assert held(q) is held(k) is held(q)  # loaded once, kept
    _, streamed = reusable_hessians(
        hdir, model, targets, fingerprint(model), _params(1).calibrate.max_hessian_bytes
    )
    first = streamed(q)
    streamed("model.encoder.layers.0.fc2")
    assert streamed(q) is not first and torch.equal(streamed(q), first)  # read again from disk
    pruned = []
    for get_hessian in (held, streamed):
        m = copy.deepcopy(model)
        prune_layers(m, targets, get_hessian, method="sparsegpt", sparsity=0.5, progress=False)
        pruned.append(m.state_dict())
    assert all(torch.equal(pruned[0][k], pruned[1][k]) for k in pruned[0])


def test_unfinished_or_failed_writer_keeps_the_old_set(tmp_path):
    out = tmp_path / "set"
    with hessian_set_writer(out) as w:
        w.add("a", torch.eye(3, dtype=torch.float64), 5)
        w.finish({"b": "a"}, {"model_id": "old"})
    with pytest.raises(KeyboardInterrupt), hessian_set_writer(out) as w:
        w.add("a", 2 * torch.eye(3, dtype=torch.float64), 5)
        raise KeyboardInterrupt  # killed between two blocks
    with pytest.raises(ArtifactError, match="not finished"), hessian_set_writer(out) as w:
        w.add("a", 2 * torch.eye(3, dtype=torch.float64), 5)
    lost_leader = pytest.raises(ArtifactError, match=r"share the input of \['c'\]")
    with lost_leader, hessian_set_writer(out) as w:
        w.add("a", torch.eye(3, dtype=torch.float64), 5)
        w.finish({"b": "c"}, {"model_id": "new"})
    manifest = read_manifest(out)
    assert manifest["model_id"] == "old" and manifest["layers"]["b"]["shared_with"] == "a"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["set"]  # no temp dirs left


def test_decoder_passes_reuse_the_cached_encoder_output(tiny, calib_utts):
    """After the first pass that reaches the decoder, passes do not run the encoder again."""
    model, processor = tiny
    layers = linear_layers(model)
    prompt = decoder_prompt_ids(model, processor, language="en")
    runs: list[int] = []
    handle = model.get_encoder().register_forward_hook(lambda *_: runs.append(1))
    got: dict[str, torch.Tensor] = {}
    try:
        counts, layout = calibrate_in_passes(
            model,
            processor,
            calib_utts[:2],
            layers,
            prompt,
            lambda name, stat: got.setdefault(name, stat.hessian()),
            max_bytes=8 * MiB,
            batch_size=2,
            progress=False,
        )
    finally:
        handle.remove()
    encoder_side = [n for n in layout.dims if n.startswith("model.encoder.")]
    assert counts["passes"] > 8 and len(got) == len(layout.dims) == 42
    # completed encoder runs: the probe, and the first pass that reaches the decoder; the
    # passes over encoder layers stop inside the encoder, the later ones read the cache
    assert len(runs) == 2, (len(runs), len(encoder_side))
    H = got["model.decoder.layers.3.fc2"]
    assert H.shape == (1536, 1536) and torch.isfinite(H).all() and float(H.trace()) > 0
