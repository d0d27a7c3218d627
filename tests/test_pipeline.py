"""Chapter 5: every schedule on real ranks gives the single device's loss and gradients."""

import pipeline_workers as W
import pytest
import torch
from cli_runs import cli_losses

from course_lib.launch import run_distributed
from course_lib.model import GPTConfig, loss_fn
from course_lib.parallel.pipeline import split_blocks


def _reference(tied: bool, n: int):
    torch.set_num_threads(1)
    model = W.model(GPTConfig(**{**W.CONFIG.__dict__, "tie_weights": tied}))
    x, y = W.batch(n)
    loss = loss_fn(model(x), y)
    loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    return float(loss.detach()), grads


def _configs(p: int) -> list[tuple[str, int, int]]:
    """Every schedule at m in {p, p + 1, 2p}; interleaved (v = 2) where m is a multiple of p."""
    out = [(s, m, 1) for s in ("gpipe", "1f1b", "zb") for m in (p, p + 1, 2 * p)]
    return out + [("interleaved", m, 2) for m in (p, 2 * p)]


BATCH = {2: 12, 3: 12, 4: 40}  # divisible by every m of _configs(p)


@pytest.mark.timeout(240)
@pytest.mark.parametrize("p, tied", [(2, True), (2, False), (3, True), (4, True)])
def test_every_schedule_matches_single_device(p, tied):
    n = BATCH[p]
    ref_loss, ref = _reference(tied, n)
    configs = _configs(p)
    results = run_distributed(W.pipeline_grads_many, p, configs, n, tied, timeout_s=200)
    for c, config in enumerate(configs):
        seen = set()
        for rank, ranks_results in enumerate(results):
            loss, grads = ranks_results[c]
            assert loss == pytest.approx(ref_loss, rel=1e-6), (config, rank)
            for name, grad in grads.items():
                key = "wte.weight" if name == "lm_head.weight" and tied else name
                torch.testing.assert_close(grad, ref[key], rtol=1e-5, atol=1e-6,
                                           msg=f"{config}: {name} on rank {rank}")  # fmt: skip
                seen.add(key)
        assert seen == set(ref), (config, set(ref) - seen)


def test_a_pipeline_that_cannot_run_is_refused_with_the_fix():
    from course_lib.parallel.pipeline_strategy import check_pipeline

    with pytest.raises(ValueError, match="at least as many micro-batches as stages.*m >= 3"):
        check_pipeline(3, 8, 12, "1f1b", 2, 1)
    with pytest.raises(ValueError, match="does not split into 5 equal micro-batches"):
        check_pipeline(2, 8, 12, "gpipe", 5, 1)
    with pytest.raises(ValueError, match="multiple"):
        check_pipeline(2, 8, 12, "interleaved", 3, 2)
    with pytest.raises(ValueError, match="8 stages but only 4 blocks"):
        check_pipeline(4, 4, 16, "interleaved", 4, 2)
    with pytest.raises(ValueError, match="need the interleaved schedule"):
        check_pipeline(2, 8, 12, "1f1b", 2, 2)


def test_split_blocks():
    assert split_blocks(5, 2) == [range(0, 3), range(3, 5)]
    assert split_blocks(4, 2, [1, 3]) == [range(0, 1), range(1, 4)]
    with pytest.raises(ValueError, match="only 2 blocks"):
        split_blocks(2, 3)
    with pytest.raises(ValueError, match="at least one block"):
        split_blocks(4, 2, [4, 0])


# --- The training loop: `--strategy pp` reproduces `single`'s losses --------------------

LOOP = [("gpipe", 2, 4, 1), ("1f1b", 3, 3, 1), ("zb", 2, 4, 1), ("interleaved", 2, 2, 2)]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("schedule, p, m, v", LOOP)
def test_training_loop_reproduces_single_device(schedule, p, m, v):
    from course_lib.data import load_text, make_dataset
    from course_lib.train import TrainConfig, train, train_worker

    model = GPTConfig(n_layer=4, n_head=2, n_embd=32, block_size=16)
    cfg = TrainConfig(steps=4, batch_size=12, seq_len=16, warmup_steps=1, eval_interval=2,
                      eval_batches=1, grad_clip=1.0)  # fmt: skip
    data = make_dataset(load_text(None), 0.1)
    single = train(model, cfg, data, progress=False)
    options = {"schedule": schedule, "microbatches": m, "chunks": v}
    ours = run_distributed(train_worker, p, "pp", options, model_config=model, train_config=cfg,
                           dataset=data, progress=False, timeout_s=240,
                           threads_per_rank=1)[0]  # fmt: skip
    for key in ("loss", "val_loss"):
        got = [r[key] for r in ours.metrics if r[key] is not None]
        want = [r[key] for r in single.metrics if r[key] is not None]
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    want = single.model.state_dict()
    for name, value in ours.model.state_dict().items():
        torch.testing.assert_close(value, want[name], rtol=1e-4, atol=1e-5, msg=name)


# --- Beside torch's own: torch.distributed.pipelining on the same stages ---------------


@pytest.mark.timeout(240)
@pytest.mark.parametrize("schedule, p, m, v", [("gpipe", 2, 4, 1), ("1f1b", 3, 3, 1),
                                               ("interleaved", 2, 4, 2)])  # fmt: skip
def test_same_losses_and_gradients_as_torch_pipelining(schedule, p, m, v):
    theirs = run_distributed(W.torch_pipelining_grads, p, schedule, m, v, 12, timeout_s=120)
    ours = run_distributed(W.pipeline_grads, p, schedule, m, v, 12, False, timeout_s=120)
    assert theirs[-1][0] == pytest.approx(ours[-1][0], rel=1e-6)  # the last stage's loss
    for rank, ((_, want), (_, got)) in enumerate(zip(theirs, ours, strict=True)):
        assert set(got) == set(want), rank
        for name in want:
            torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.timeout(300)
def test_cli_pp_reproduces_single_device_losses(tmp_path):
    common = ["train", "--n-layer", "2", "--n-head", "2", "--n-embd", "32", "--seq-len", "16",
              "--batch-size", "4", "--steps", "3", "--warmup-steps", "1", "--eval-interval",
              "3", "--eval-batches", "1", "--no-progress", "--sample-tokens", "0",
              "--device", "cpu"]  # fmt: skip
    runs = {"single": [], "pp": ["--strategy", "pp", "--schedule", "zb", "--world-size", "2",
                                 "--microbatches", "2"]}  # fmt: skip
    losses = cli_losses(tmp_path, common, runs)
    torch.testing.assert_close(losses["pp"], losses["single"], rtol=1e-5, atol=1e-5)


@pytest.mark.timeout(300)
def test_a_pipeline_checkpoint_resumes_on_one_device_and_back(tmp_path):
    """Checkpoint pieces are named as in the plain GPT: pp -> single -> pp, same losses."""
    from course_lib.data import load_text, make_dataset
    from course_lib.train import TrainConfig, train, train_worker

    model = GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16)
    cfg = TrainConfig(steps=6, batch_size=4, seq_len=16, warmup_steps=1, eval_interval=3,
                      eval_batches=1)  # fmt: skip
    data = make_dataset(load_text(None), 0.1)
    whole = train(model, cfg, data, progress=False)
    kwargs = dict(model_config=model, dataset=data, progress=False, out_dir=tmp_path)
    launch = dict(timeout_s=200, threads_per_rank=1)
    options = {"schedule": "1f1b", "microbatches": 2}
    stop = lambda k: TrainConfig(**{**cfg.__dict__, "stop_at": k})  # noqa: E731
    run_distributed(train_worker, 2, "pp", options, train_config=stop(2), **kwargs, **launch)
    train(model, stop(4), data, progress=False, out_dir=tmp_path, resume=True)
    resumed = run_distributed(train_worker, 2, "pp", options, train_config=cfg, resume=True,
                              **kwargs, **launch)[0]  # fmt: skip
    got = [m["loss"] for m in resumed.metrics]
    want = [m["loss"] for m in whole.metrics]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
