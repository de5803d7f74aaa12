"""VQ-VAE invariants (van den Oord et al. 2017) with tiny CPU models, its two-stage training, the commands
through the family contract, and two gloo ranks keeping one codebook."""

from __future__ import annotations

import dataclasses
import json
import math
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image
from safetensors.torch import load_file, save_file

from medivae import api
from medivae.cli import main
from medivae.models import build_model, model_config
from medivae.models.family import StepContext
from medivae.runfolder.config import DataConfig, RunConfig, TrainConfig
from medivae.runtime.errors import UserError
from medivae.workflows import train as train_workflow

from tiny import train_killed_after
from tolerance import gamma, network_bound, rel_err

TINY = dict(image_size=32, codebook_size=16, code_dim=8, width=16, res_width=8, res_blocks=1,
            prior_width=16, prior_layers=1, prior_heads=2, prior_epochs=1)
TINY_ARGS = [a for k, v in TINY.items() if k != "image_size" for a in ("--model-arg", f"{k}={v}")]


def tiny(**kw):
    return build_model(model_config("vq_vae", **{**TINY, **kw}))


def tiny_run(epochs: int = 3, source: str = "phantoms:120", **kw) -> RunConfig:
    return RunConfig(
        data=DataConfig(source=source, image_size=32),
        model=model_config("vq_vae", **{**TINY, **kw}),
        train=TrainConfig(epochs=epochs, batch_size=32, precision="fp32", seed=1767661200070),
    )


def ctx(epoch: int = 1, epochs: int = 3) -> StepContext:
    return StepContext(epoch, 0, epoch - 1.0, TrainConfig(epochs=epochs, precision="fp32"))


def images(n: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 1, 32, 32, generator=torch.Generator().manual_seed(seed))


def train_step(model, x, epoch: int = 1, epochs: int = 3):
    c = ctx(epoch, epochs)
    step = next(s for s in model.training_steps() if s.runs(c))
    return step.run(model.trained_modules(), x, None, c)


def codebook_state(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if "codebook" in k}


# --- invariants ---------------------------------------------------------------------------------------
def test_decoding_the_indices_reproduces_the_quantised_tensor_exactly():
    torch.manual_seed(0)
    model = tiny()
    train_step(model, images(8, 1))  # a codebook initialised from encoder outputs
    x = images()
    enc = model.encode(x)
    out = model.autoencoder(x)
    assert enc.indices.dtype == torch.int64 and enc.indices.shape == (4, 8, 8)
    assert enc.mode().shape == enc.arrays()["embeddings"].shape == (4, 8, 8, 8)
    assert torch.equal(model.autoencoder.codebook.lookup(enc.indices), out.vq.quantized)
    assert torch.equal(enc.arrays()["embeddings"], out.vq.quantized)
    assert torch.equal(model.decode_indices(enc.indices), model.reconstruct(x))
    assert torch.equal(model.decode(enc.mode()), model.reconstruct(x))  # decode quantises the latent
    # the embeddings of codes quantise back to themselves
    assert torch.equal(model.encode(x).indices, model.autoencoder.codebook.nearest(
        enc.embeddings.permute(0, 2, 3, 1).reshape(-1, 8)).view(4, 8, 8))


def test_ema_buffers_change_in_training_and_not_in_evaluation():
    torch.manual_seed(0)
    model = tiny()
    x = images()
    before = codebook_state(model)
    train_step(model, x)
    after = codebook_state(model)
    for k in ("autoencoder.codebook.embedding", "autoencoder.codebook.cluster_size", "autoencoder.codebook.embed_sum"):
        assert not torch.equal(before[k], after[k]), k
    model.train()  # the argument decides, not the module's mode
    model.validation_terms(x, None, None)
    model.reconstruct(x)
    model.decode(model.encode(x).mode())
    model.sample(2, generator=torch.Generator().manual_seed(0))
    for k, v in codebook_state(model).items():
        assert torch.equal(after[k], v), k
    assert model.epoch_end(ctx())["codebook_usage"] > 0  # the training step was counted, and only it


def test_a_dead_code_is_restarted_at_an_encoder_output():
    torch.manual_seed(0)
    model = tiny()
    x = images()
    train_step(model, x)
    cb = model.autoencoder.codebook
    cb.cluster_size.fill_(100.0)
    cb.embed_sum.copy_(cb.embedding * 100.0)
    cb.embedding[3] = 1e3  # never the nearest code
    cb.embed_sum[3] = 1e3 * 100.0
    cb.cluster_size[3] = 0.5  # below the threshold of 1 assignment per step
    z = model.autoencoder.encoder(x).detach().permute(0, 2, 3, 1).reshape(-1, 8)
    out = train_step(model, x)
    assert out.terms["restarts"].item() == 1
    # now one of the batch's encoder outputs: the same computation on the same input, so equal up to at most
    # the rounding of another kernel order (differences taken directly: cdist's |a|^2 + |b|^2 - 2ab cancels)
    nearest = (z - cb.embedding[3]).norm(dim=1).min()
    assert nearest <= network_bound(model.autoencoder.encoder) * z.norm(dim=1).max()
    assert cb.cluster_size[3] == 1.0


def test_the_straight_through_gradient_reaches_the_encoder():
    torch.manual_seed(0)
    model = tiny(commitment=0.0)  # no commitment term: the encoder learns through the quantiser only
    out = train_step(model, images())
    out.loss.backward()
    for name, p in model.autoencoder.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert all(p.grad is None for p in model.prior.parameters())  # stage 1 leaves the prior alone


def test_stage_two_trains_the_prior_only():
    torch.manual_seed(0)
    model = tiny()
    train_step(model, images())
    frozen = codebook_state(model)
    out = train_step(model, images(), epoch=3, epochs=3)
    out.loss.backward()
    assert all(p.grad is None for p in model.autoencoder.parameters())
    assert all(p.grad is not None for p in model.prior.parameters())
    assert out.terms["prior_bits_per_code"].shape == (4,)
    for k, v in codebook_state(model).items():
        assert torch.equal(frozen[k], v), k


def test_untrained_prior_is_uniform_so_kl_is_log_k_per_code():
    model = tiny()
    terms = model.validation_terms(images(), None, None)
    torch.testing.assert_close(terms["kl"], torch.full((4,), 64 * math.log(16)))
    torch.testing.assert_close(terms["prior_bits_per_code"], torch.full((4,), 4.0))
    torch.testing.assert_close(terms["loss"], terms["rec"] + terms["kl"])


def test_sampling_at_a_fixed_seed_is_deterministic_and_sized():
    torch.manual_seed(0)
    model = tiny().eval()
    train_step(model, images())
    a = model.sample(3, generator=torch.Generator().manual_seed(7))
    b = model.sample(3, generator=torch.Generator().manual_seed(7))
    c = model.sample(3, generator=torch.Generator().manual_seed(8), temperature=2.0)
    assert a.shape == (3, 1, 32, 32) and a.dtype == torch.float32 and 0 <= a.min() and a.max() <= 1
    assert torch.equal(a, b) and not torch.equal(a, c)
    z = model.prior_latents(3, torch.Generator().manual_seed(7))
    assert z.shape == (3, 8, 8, 8)
    assert torch.equal(model.decode(z), a)  # the same draws, decoded through the latent path


def test_cached_prior_sampling_equals_recomputing_the_causal_forward():
    from medivae.models.vq_prior import CodePrior

    torch.manual_seed(0)
    prior = CodePrior(16, 20, 16, 2, 2, 0).eval()
    torch.nn.init.normal_(prior.head.weight)  # not uniform, so a wrong context changes the draws
    codes = prior.sample(5, None, torch.Generator().manual_seed(1))
    g, ref = torch.Generator().manual_seed(1), torch.zeros(5, 20, dtype=torch.long)
    with torch.no_grad():
        for i in range(20):  # position i sees only ref[:, :i], which is already drawn
            ref[:, i] = torch.multinomial(torch.softmax(prior(ref)[:, i].float(), -1), 1, generator=g)[:, 0]
    assert torch.equal(codes, ref)


def _peaked_prior(length: int = 20):
    from medivae.models.vq_prior import CodePrior

    torch.manual_seed(0)
    prior = CodePrior(16, length, 16, 2, 2, 0).eval()
    torch.nn.init.normal_(prior.head.weight)  # not uniform: the ranking of codes depends on the context
    return prior


def test_top_k_one_is_the_greedy_mode_whatever_the_seed():
    prior = _peaked_prior()
    a = prior.sample(5, None, torch.Generator().manual_seed(1), temperature=3.0, top_k=1)
    b = prior.sample(5, None, torch.Generator().manual_seed(2), top_k=1)
    greedy = torch.zeros(5, 20, dtype=torch.long)
    with torch.no_grad():
        for i in range(20):  # position i sees only the codes already chosen
            greedy[:, i] = prior(greedy)[:, i].argmax(-1)
    assert torch.equal(a, b) and torch.equal(a, greedy)
    full = prior.sample(5, None, torch.Generator().manual_seed(1))
    assert not torch.equal(full, greedy)  # without top-k the draws are not the mode


def test_top_k_draws_only_among_the_k_most_likely_codes():
    prior, k = _peaked_prior(), 3
    codes = prior.sample(64, None, torch.Generator().manual_seed(4), temperature=2.0, top_k=k)
    with torch.no_grad():
        logits = prior(codes).float()  # (B, L, K): the same conditionals the draws were made from
    chosen = logits.gather(2, codes[..., None])  # (B, L, 1)
    # the cached and the full forward differ by rounding only: a bound of a few ulps of the largest logit
    slack = 64 * torch.finfo(torch.float32).eps * logits.abs().max()
    above = (logits > chosen + slack).sum(2)  # codes clearly more likely than the one drawn
    assert int(above.max()) < k
    assert int(above.max()) == k - 1  # the k-th most likely code is drawn somewhere: top-k is not top-1
    assert not torch.equal(codes, prior.sample(64, None, torch.Generator().manual_seed(4), top_k=1))


def test_top_k_reaches_sample_and_is_refused_where_it_does_not_apply(cli_run, tmp_path, capsys):
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    for seed, out in (("1", a), ("2", b)):
        assert main(["sample", str(cli_run), "-n", "4", "--seed", seed, "--top-k", "1", "--out", str(out)]) == 0
    assert np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b)))  # greedy: no seed matters
    err = _one_line_error(capsys, ["sample", str(cli_run), "-n", "2", "--top-k", "2", "--sampler", "gmm",
                                   "--out", str(tmp_path / "c.png")])
    assert "--top-k is an option of the family's code prior" in err
    assert not (tmp_path / "c.png").exists()


def test_class_conditional_prior_samples_the_label():
    torch.manual_seed(0)
    model = tiny(num_classes=2)
    assert {"sample", "conditional", "latent", "heal", "code_prior"} == model.capabilities
    with torch.no_grad():  # make the two start tokens far apart so the label visibly matters
        model.prior.head.weight.normal_()
        model.prior.start.weight.mul_(100)
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    assert not torch.equal(model.sample_indices(4, 0, g()), model.sample_indices(4, 1, g()))
    assert torch.equal(model.sample_indices(4, 1, g()), model.sample_indices(4, torch.ones(4, dtype=torch.long), g()))


def test_bf16_autocast_step_is_finite_with_fp32_codebook():
    torch.manual_seed(0)
    model = tiny().to(memory_format=torch.channels_last)
    x = images().contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = train_step(model, x)
        prior_out = train_step(model, x, epoch=3, epochs=3)
    out.loss.backward()
    prior_out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(prior_out.loss)
    assert model.autoencoder.codebook.embedding.dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        enc = model.encode(x)
    z = model.autoencoder.encoder(x)  # fp32 encoder outputs of the same images
    assert z.dtype == torch.float32
    # only the encoder rounds to bf16: its output is within its network bound of fp32's ...
    assert rel_err(enc.z, z) <= network_bound(model.autoencoder.encoder, torch.bfloat16)
    # ... and the codes are the nearest to that output in fp32: the exact (float64) nearest wherever the gap
    # between the two nearest squared distances |r|^2 - 2 r.e + |e|^2 exceeds their fp32 rounding bound
    # (distances in bf16 pick another code at most of these positions)
    rows = enc.z.detach().permute(0, 2, 3, 1).flatten(0, 2).double()  # (B*h*w, D)
    e = model.autoencoder.codebook.embedding.double()
    top = (torch.cdist(rows, e) ** 2).topk(2, largest=False)
    rounding = 2 * gamma(rows.shape[1] + 2) * (rows.norm(dim=1) + e.norm(dim=1).max()) ** 2
    clear = top.values[:, 1] - top.values[:, 0] > rounding
    assert clear.float().mean() > 0.5  # the check covers most positions
    assert torch.equal(enc.indices.flatten()[clear], top.indices[clear, 0])


def test_capabilities_and_config_errors():
    assert tiny().capabilities == {"latent", "sample", "heal", "code_prior"}
    assert tiny(prior_epochs=0).capabilities == {"latent"}
    assert tiny(prior_epochs=0).prior is None
    for bad, match in [({"downsample": 16}, "downsample 16 does not fit image size 32"),
                       ({"downsample": 3}, "downsample 3"), ({"codebook_size": 1}, "codebook size"),
                       ({"ema_decay": 1.0}, "ema decay"), ({"num_classes": 2, "prior_epochs": 0}, "prior_epochs"),
                       ({"prior_width": 10, "prior_heads": 4}, "multiple"), ({"latent_dim": 4}, "no option")]:
        with pytest.raises(UserError, match=match):
            model_config("vq_vae", **{**TINY, **bad})
    with pytest.raises(UserError, match="--epochs must exceed"):
        tiny(prior_epochs=3).optimizers(TrainConfig(epochs=3), torch.device("cpu"))


# --- training: stages, best checkpoint, resume ------------------------------------------------------------
def _quiet(monkeypatch):
    monkeypatch.setattr(api, "write_run_report", lambda run_dir: None)  # matplotlib time


def test_two_stages_and_the_best_checkpoint_follow_the_prior(tmp_path, monkeypatch):
    _quiet(monkeypatch)
    run = api.train(tiny_run(epochs=3), tmp_path / "r", progress=False)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert "train_mse" in rows[1] and "train_kl" not in rows[1]  # epoch 2: autoencoder
    assert "train_kl" in rows[2] and "train_mse" not in rows[2]  # epoch 3: prior
    assert all(0 < r["train_codebook_usage"] <= 1 and r["train_codebook_perplexity"] >= 1 for r in rows)
    uniform = 64 * math.log(16)
    assert rows[1]["val_kl"] == pytest.approx(uniform, rel=1e-5)
    assert rows[2]["val_kl"] < uniform and rows[2]["val_rec"] == rows[1]["val_rec"]  # frozen autoencoder
    state = json.loads((run / "best" / "state.json").read_text())
    assert state["best_epoch"] == 3  # the trained prior's checkpoint is the best one
    # codebook usage is a whole-set number: no per-batch "usage" beside it; on validation images it is the
    # share of codes the validation images are given
    assert not any(k.endswith(("_usage", "_perplexity")) and "codebook" not in k for r in rows for k in r)
    from medivae.runfolder.run import load_run

    opened = load_run(run, which="last", device="cpu")
    val = opened.split("val")
    with torch.no_grad():
        codes = opened.model.encode(opened.images(val.images)).indices
    assert rows[2]["val_codebook_usage"] == codes.unique().numel() / 16


def test_a_crash_in_stage_two_resumes_to_the_uninterrupted_weights(tmp_path, monkeypatch):
    _quiet(monkeypatch)
    cfg = tiny_run(epochs=4, prior_epochs=2)
    api.train(cfg, tmp_path / "straight", progress=False)

    train_killed_after(cfg, tmp_path / "resumed", 3, monkeypatch)
    api.train(cfg, tmp_path / "resumed", resume=True, progress=False)
    a = load_file(str(tmp_path / "straight" / "last" / "model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "last" / "model.safetensors"))
    assert a.keys() == b.keys() and any(k.startswith("prior.") for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k


# --- the commands -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("vq") / "run"
    argv = ["train", "--data", "phantoms:120", "--image-size", "32", "--model", "vq_vae", *TINY_ARGS,
            "--epochs", "3", "--batch-size", "32", "--precision", "fp32", "--device", "cpu", "--threads", "1",
            "--no-progress", "--out", str(out)]
    assert main(argv) == 0
    return out


def _grid(path, n: int, cols: int, size: int = 32) -> np.ndarray:
    img = np.asarray(Image.open(path))
    rows = -(-n // cols)
    assert img.shape == (rows * (size + 2) + 2, cols * (size + 2) + 2)
    return img


def test_cli_train_then_sample_encode_reconstruct_interpolate(cli_run, tmp_path):
    assert (cli_run / "samples.png").exists() and (cli_run / "report.html").exists()
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    assert main(["sample", str(cli_run), "-n", "6", "--seed", "5", "--temperature", "0.8", "--out", str(a)]) == 0
    assert main(["sample", str(cli_run), "-n", "6", "--seed", "5", "--temperature", "0.8", "--out", str(b)]) == 0
    img = _grid(a, 6, 3)
    assert np.array_equal(img, np.asarray(Image.open(b))) and img[2:34, 2:34].std() > 0  # not a blank tile

    npz = tmp_path / "codes.npz"
    assert main(["encode", str(cli_run), "--out", str(npz)]) == 0
    codes = np.load(npz)
    n = len(codes["labels"])
    assert codes["indices"].shape == (n, 8, 8) and codes["indices"].dtype == np.int64
    assert codes["embeddings"].shape == (n, 8, 8, 8) and codes["indices"].max() < 16

    rec = tmp_path / "r.png"
    assert main(["reconstruct", str(cli_run), "-n", "5", "--out", str(rec)]) == 0
    _grid(rec, 10, 5)

    inter = tmp_path / "i.png"
    assert main(["interpolate", str(cli_run), "--steps", "5", "--out", str(inter)]) == 0
    _grid(inter, 5, 5)
    for name, value in (("x.png", 30), ("y.png", 220)):
        Image.fromarray(np.full((40, 50), value, dtype=np.uint8)).save(tmp_path / name)
    assert main(["interpolate", str(cli_run), "--from", str(tmp_path / "x.png"), "--to", str(tmp_path / "y.png"),
                 "--steps", "4", "--out", str(inter), "--force"]) == 0  # i.png exists: replaced with --force
    _grid(inter, 4, 4)


def _one_line_error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("medivae: error:"), err
    return err


def test_without_a_prior_sample_is_a_one_line_error(tmp_path, capsys, monkeypatch):
    _quiet(monkeypatch)
    run = api.train(tiny_run(epochs=1, prior_epochs=0), tmp_path / "r", progress=False)
    assert not (run / "samples.png").exists() and (run / "reconstructions.png").exists()
    err = _one_line_error(capsys, ["sample", str(run), "-n", "2", "--out", str(tmp_path / "s.png")])
    assert "vq_vae cannot draw samples" in err
    assert main(["reconstruct", str(run), "-n", "2", "--out", str(tmp_path / "r.png")]) == 0


def test_impossible_options_are_one_line_errors(tmp_path, capsys):
    base = ["train", "--data", "phantoms:40", "--image-size", "32", "--model", "vq_vae", "--out", str(tmp_path / "x")]
    assert "downsample 16" in _one_line_error(capsys, [*base, "--model-arg", "downsample=16"])
    assert "codebook size" in _one_line_error(capsys, [*base, "--model-arg", "codebook_size=1"])
    assert "--epochs must exceed" in _one_line_error(capsys, [*base, "--epochs", "2", "--model-arg", "prior_epochs=2"])
    assert not (tmp_path / "x").exists()


# --- two gloo ranks -----------------------------------------------------------------------------------------
WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    folder = Path(out)
    try:
        torch.manual_seed(0)  # the same initial model on both ranks
        model = tiny()
        torch.manual_seed(100 + rank)  # different restart draws: only rank 0's may count
        opt = model.optimizers(TrainConfig(epochs=3), torch.device("cpu"))["model"]
        for step in range(3):  # different images per rank, no DDP: only the codebook's all-reduce is shared
            res = train_step(model, images(4, seed=10 * rank + step))
            opt.zero_grad()
            res.loss.backward()
            opt.step()
        save_file({k: v.contiguous() for k, v in codebook_state(model).items()},
                  str(folder / f"codebook{rank}.safetensors"))
        (folder / f"stats{rank}.json").write_text(json.dumps(model.epoch_end(ctx())))
        # the trainer under DDP: one DDP module per optimizer, both stages
        train_workflow.write_run_report = lambda run_dir: None
        api.train(tiny_run(epochs=2, source="phantoms:40"), folder / "ddp", progress=False)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def gloo_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("vq-ddp")
    mp.spawn(_worker, args=(_free_port(), str(out)), nprocs=WORLD, join=True)
    return out


def test_two_gloo_ranks_keep_identical_codebooks(gloo_out):
    a, b = (load_file(str(gloo_out / f"codebook{r}.safetensors")) for r in range(WORLD))
    for k in a:
        assert torch.equal(a[k], b[k]), k
    s0, s1 = (json.loads((gloo_out / f"stats{r}.json").read_text()) for r in range(WORLD))
    assert s0 == s1
    w0 = load_file(str(gloo_out / "ddp" / "last" / "model.safetensors"))
    assert any(k.startswith("prior.") for k in w0)
    rows = [json.loads(line) for line in (gloo_out / "ddp" / "metrics.jsonl").read_text().splitlines()]
    assert [("train_mse" in r, "train_kl" in r) for r in rows] == [(True, False), (False, True)]


def test_resume_refuses_a_changed_codebook_size(tmp_path, monkeypatch):
    _quiet(monkeypatch)
    cfg = tiny_run(epochs=2)
    api.train(cfg, tmp_path / "r", progress=False)
    other = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, codebook_size=32))
    with pytest.raises(UserError, match="codebook_size"):
        api.train(other, tmp_path / "r", resume=True, progress=False)


def test_a_run_saved_with_four_prior_heads_loads_and_samples_with_them(tmp_path):
    """prior_heads was 4 by default before it became 2: a run saved then keeps its 4 heads (the weights have the
    same shapes either way, so loading with the new default would not fail, it would sample wrongly)."""
    import medivae

    run = api.train(tiny_run(epochs=2, source="phantoms:60", prior_heads=4), tmp_path / "r", progress=False)
    assert json.loads((run / "config.json").read_text())["model"]["prior_heads"] == 4
    r = medivae.load(run, device="cpu")
    assert [b.heads for b in r.model.prior.blocks] == [4]
    a = r.sample(3, seed=5, top_k=2)
    assert a.shape == (3, 1, 32, 32) and torch.equal(a, r.sample(3, seed=5, top_k=2))
