"""Split learning (FL-GLM): the invariants, the wire, the three server modes, dropout."""

from __future__ import annotations

import json
import math
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from peft import get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from silotune.cli import main
from silotune.config import Config, load_config
from silotune.data.sft import IGNORE_INDEX
from silotune.errors import ConfigError
from silotune.modeling.adapters import peft_lora_config
from silotune.security.tls import create_dev_pki
from silotune.split.adapters import add_segment_adapter
from silotune.split.codecs import encode_mask
from silotune.split.link import MiddleLink, RemoteMiddle, SplitError
from silotune.split.model import SplitCausalLM
from silotune.split.protocol import Frame, Kind, encode
from silotune.split.segments import Segments, split_model
from silotune.split.server import serve
from silotune.split.trainers import MiddleTrainer, adapter_state, build_trainer
from silotune.split.trainers.state import load_training_state, save_training_state

from .conftest import CONFIGS

VOCAB = 97


def tiny_llama(layers: int = 4, seed: int = 0) -> LlamaForCausalLM:
    """A random Llama small enough for exact comparisons."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    return LlamaForCausalLM(cfg).eval()


def split_config(*overrides: str) -> Config:
    base = [
        "model.name=tiny-llama",
        "train.lr=0.01",
        "lora.dropout=0.0",
        "split.connect_timeout_s=3",
    ]
    return load_config(None, [*base, *overrides])


def batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ids, mask and labels (prompt and padding masked), as training sees them."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (3, 12), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, 9:] = 0
    mask[2, 6:] = 0
    labels = torch.where(mask.bool(), ids, torch.full_like(ids, IGNORE_INDEX))
    labels[:, :3] = IGNORE_INDEX
    return ids, mask, labels


def randomise_lora(model: torch.nn.Module) -> None:
    """LoRA B starts at zero (no gradient reaches A); make every adapter tensor non-trivial."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.1)


def test_segments_reproduce_full_model_logits() -> None:
    model = tiny_llama()
    ids, mask, _ = batch()
    full = model(input_ids=ids, attention_mask=mask).logits
    s = split_model(model, 1, 1)
    out = s.back(s.middle(s.front(ids, mask), mask), mask)
    real = mask.bool()
    assert torch.equal(full[real], out[real])
    # Decoding keeps the newest position's logits alone (the head over a prompt is not run).
    last = s.back(s.middle(s.front(ids, mask), mask), mask, last_only=True)
    assert last.shape == (ids.shape[0], 1, VOCAB)
    torch.testing.assert_close(last, out[:, -1:], rtol=0, atol=1e-6)


def test_bad_split_points_are_refused() -> None:
    with pytest.raises(ConfigError, match="at least one for the server"):
        split_model(tiny_llama(layers=2), 1, 1)


@pytest.mark.parametrize("algorithm", ["split", "split-central"])
def test_ffa_lora_is_refused_where_the_segments_do_not_implement_it(algorithm: str) -> None:
    with pytest.raises(ConfigError, match=r"lora\.freeze_a .* not implemented for split"):
        split_config(f'experiment.algorithms=["{algorithm}"]', "lora.freeze_a=true")


def lora_llama() -> tuple[LlamaForCausalLM, torch.nn.Module]:
    cfg = split_config()
    model = tiny_llama()
    peft = get_peft_model(model, peft_lora_config(cfg.lora))
    randomise_lora(peft)
    return model, peft


def lora_grads(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


def test_split_step_has_the_centralized_gradients() -> None:
    model, peft = lora_llama()
    ids, mask, labels = batch()
    peft(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    central = lora_grads(peft.base_model.model)
    peft.zero_grad()
    s = split_model(model, 1, 1)
    split = SplitCausalLM(s.front, s.back, s.middle)
    split(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    got = lora_grads(peft.base_model.model)
    assert got.keys() == central.keys() and len(got) == 16  # q, v x A, B x 4 blocks
    for name, grad in central.items():
        torch.testing.assert_close(got[name], grad, rtol=1e-5, atol=1e-7, msg=name)


@contextmanager
def running_server(
    segments: Segments, config: Config, certs: Path | None = None, expected: int = 0
) -> Iterator[tuple[int, MiddleTrainer]]:
    """A split server in this process, on a free loopback port."""
    trainer = build_trainer(segments.middle, config)
    server, port, _ = serve(trainer, config, "127.0.0.1:0", certs, expected)
    try:
        yield port, trainer
    finally:
        server.stop(grace=None)


def test_gradients_over_the_wire_match_centralized(tmp_path: Path) -> None:
    """mTLS + AES-GCM frames, float32 on the wire: the client's gradients are exact."""
    config = split_config()
    create_dev_pki(tmp_path, ["site-a"])
    model, peft = lora_llama()
    ids, mask, labels = batch()
    peft(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    central = lora_grads(peft.base_model.model)
    peft.zero_grad()
    s = split_model(model, 1, 1)  # the segments share the PEFT model's modules
    with running_server(s, config, certs=tmp_path) as (port, trainer):
        link = MiddleLink(config, "site-a", f"localhost:{port}", tmp_path)
        split = SplitCausalLM(s.front, s.back, RemoteMiddle(link))
        split(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        link.close()
    assert trainer.steps == 1
    client_side = lora_grads(peft.base_model.model)  # the server stepped and cleared its own
    assert len(client_side) == 8  # front block 0 and back block 3: q, v x A, B
    for name, grad in client_side.items():
        torch.testing.assert_close(grad, central[name], rtol=1e-5, atol=1e-7, msg=name)


def client_model(
    config: Config, port: int, client: str, seed: int
) -> tuple[SplitCausalLM, MiddleLink]:
    """A client with its own copy of front/back (the server's middle stays on the server)."""
    s = split_model(tiny_llama(seed=0), 1, 1)
    add_segment_adapter(s.front, config, f"front-{seed}")
    add_segment_adapter(s.back, config, f"back-{seed}")
    link = MiddleLink(config, client, f"localhost:{port}", None)
    return SplitCausalLM(s.front, s.back, RemoteMiddle(link)), link


def train_client(model: SplitCausalLM, steps: int, seed: int, rows: int = 3) -> list[float]:
    """`steps` AdamW steps on the first `rows` rows of each batch; the losses."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.01)
    losses = []
    for step in range(steps):
        ids, mask, labels = (t[:rows] for t in batch(seed * 100 + step))
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def in_threads(fns: list[Callable[[], object]]) -> list[object]:
    results: list[object] = [None] * len(fns)
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            results[i] = fns[i]()
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(fns))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    if errors:
        raise errors[0]
    return results


@pytest.mark.parametrize(
    ("mode", "expected_steps"), [("serial", 6), ("batch", 3), ("per-client", 6)]
)
def test_three_modes_train_two_clients(mode: str, expected_steps: int) -> None:
    config = split_config(
        f"split.mode={mode}", "split.tls=false", "split.encrypt=false", "split.batch_window_s=20"
    )
    segments = split_model(tiny_llama(), 1, 1)
    add_segment_adapter(segments.middle, config, "middle")
    before = adapter_state(segments.middle)
    with running_server(segments, config) as (port, trainer):
        clients = [client_model(config, port, f"c{i}", i) for i in range(2)]

        def work(i: int) -> list[float]:
            model, _ = clients[i]
            return train_client(model, 3, seed=i)

        losses = in_threads([lambda i=i: work(i) for i in range(2)])
        if mode == "per-client":
            replicas = [adapter_state(r.module) for r in trainer.replicas.values()]  # type: ignore[attr-defined]
            for name, value in replicas[0].items():
                assert torch.equal(value, replicas[1][name])  # averaged every step
        for _, link in clients:
            link.close()
    assert trainer.steps == expected_steps  # batch: both clients in one stacked step
    assert all(math.isfinite(x) for run in losses for x in run)  # type: ignore[attr-defined]
    after = adapter_state(segments.middle)
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the middle trained


def assert_same_state(a: object, b: object) -> None:
    """Nested dicts/lists of tensors and plain values, equal exactly (dtypes included)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys()
        for key in a:
            assert_same_state(a[key], b[key])
    else:
        assert type(a) is type(b) and a == b


def test_server_checkpoint_restores_the_training_state_exactly(tmp_path: Path) -> None:
    config = split_config(
        "split.mode=per-client", "split.tls=false", "split.encrypt=false", "lora.dropout=0.1"
    )
    segments = split_model(tiny_llama(), 1, 1)
    add_segment_adapter(segments.middle, config, "middle")
    with running_server(segments, config) as (port, trainer):
        clients = [client_model(config, port, f"c{i}", i) for i in range(2)]
        in_threads([lambda i=i: train_client(clients[i][0], 2, seed=i) for i in range(2)])
        for _, link in clients:
            link.close()
        state = trainer.training_state()
    save_training_state(state, tmp_path / "checkpoint.safetensors")
    loaded = load_training_state(tmp_path / "checkpoint.safetensors")
    assert_same_state(state, loaded)
    fresh = split_model(tiny_llama(), 1, 1)
    add_segment_adapter(fresh.middle, config, "middle")
    restored = build_trainer(fresh.middle, config)
    restored.restore(loaded)
    for client in ("c0", "c1"):
        restored.join(client)
    assert_same_state(state, restored.training_state())


@pytest.mark.parametrize("mode", ["serial", "batch"])
def test_a_client_silent_mid_step_is_dropped(mode: str) -> None:
    config = split_config(
        f"split.mode={mode}",
        "split.tls=false",
        "split.step_timeout_s=1.5",
        "split.batch_window_s=0.5",
    )
    segments = split_model(tiny_llama(), 1, 1)
    add_segment_adapter(segments.middle, config, "middle")
    with running_server(segments, config) as (port, trainer):
        silent, silent_link = client_model(config, port, "silent", 0)
        healthy, healthy_link = client_model(config, port, "healthy", 1)
        ids, mask, _ = batch()
        hidden = silent.front(ids, mask)

        def stall() -> None:
            silent_link.forward(hidden, mask, train=True)  # and never sends its gradient

        in_threads([stall, lambda: train_client(healthy, 2, seed=1)])
        assert trainer.steps >= 2  # the healthy client's steps went through
        with pytest.raises(SplitError, match=r"dropped|no forward"):
            silent_link.backward(torch.ones_like(hidden))
        healthy_link.close()
        silent_link.close()


def test_client_vanishing_mid_step_frees_the_server() -> None:
    config = split_config("split.tls=false", "split.step_timeout_s=60")
    segments = split_model(tiny_llama(), 1, 1)
    add_segment_adapter(segments.middle, config, "middle")
    with running_server(segments, config) as (port, trainer):
        gone, gone_link = client_model(config, port, "gone", 0)
        ids, mask, _ = batch()
        gone_link.forward(gone.front(ids, mask), mask, train=True)
        gone_link._outbox.put(None)  # the stream ends without a gradient (process died)
        healthy, healthy_link = client_model(config, port, "healthy", 1)
        train_client(healthy, 1, seed=1)  # would wait 60 s if the server still held the step
        healthy_link.close()
    assert trainer.steps == 1


def test_frames_carry_no_tokens_or_labels() -> None:
    config = split_config("split.tls=false", "split.encrypt=false")
    segments = split_model(tiny_llama(), 1, 1)
    add_segment_adapter(segments.middle, config, "middle")
    sent: list[tuple[Frame, bytes]] = []
    with running_server(segments, config) as (port, _):
        model, link = client_model(config, port, "c0", 0)
        link.on_frame = lambda frame, raw: sent.append((frame, raw))
        ids, mask, labels = batch()
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        link.average(adapter_state(model), 1.0)
        link.close()
    kinds = {f.kind for f, _ in sent}
    assert kinds == {Kind.ACTIVATIONS, Kind.GRAD, Kind.AVERAGE, Kind.BYE}
    token_bytes = [ids[i][mask[i].bool()].numpy().tobytes() for i in range(len(ids))]
    for frame, raw in sent:
        for name, t in frame.tensors.items():
            assert t.is_floating_point() or name == "mask_span", name  # spans: (b, 2) lengths
            assert t.shape != ids.shape, name
        assert not any(tb in raw for tb in token_bytes)  # not even as raw int64 bytes


def genuine_activations(link: MiddleLink, hidden: torch.Tensor, mask: torch.Tensor) -> bytes:
    """An activations frame for `hidden` (without training) as `link` would seal it."""
    masks, meta = encode_mask(mask)
    tensors = {**link.activations.encode("hidden", hidden), **masks}
    frame = Frame(Kind.ACTIVATIONS, link.step, tensors, {**meta, "train": False, "cache": ""})
    return encode(frame, link.sealer)


def test_tampered_and_replayed_frames_are_refused_without_harm(tmp_path: Path) -> None:
    config = split_config()
    create_dev_pki(tmp_path, ["site-a"])
    segments = split_model(tiny_llama(), 1, 1)
    add_segment_adapter(segments.middle, config, "middle")
    with running_server(segments, config, certs=tmp_path) as (port, trainer):
        model, link = client_model_tls(config, port, tmp_path)
        ids, mask, _ = batch()
        hidden = model.front(ids, mask).detach()
        genuine = genuine_activations(link, hidden, mask)
        tampered = bytearray(genuine)
        tampered[-20] ^= 1
        with pytest.raises(SplitError, match="tampered"):
            link.send_raw(bytes(tampered))
        assert link.send_raw(genuine).kind == Kind.HIDDEN  # state unharmed: the real one opens
        with pytest.raises(SplitError, match="replayed"):
            link.send_raw(genuine)
        out = link.forward(hidden, mask, train=False)  # and the session goes on
        assert out.shape == hidden.shape
        link.close()
    assert trainer.steps == 0


def client_model_tls(config: Config, port: int, certs: Path) -> tuple[SplitCausalLM, MiddleLink]:
    s = split_model(tiny_llama(), 1, 1)
    link = MiddleLink(config, "site-a", f"localhost:{port}", certs)
    return SplitCausalLM(s.front, s.back, RemoteMiddle(link)), link


def test_clients_without_a_valid_certificate_are_refused(tmp_path: Path) -> None:
    config = split_config()
    create_dev_pki(tmp_path / "ours", ["site-a", "site-b"])
    create_dev_pki(tmp_path / "rogue", ["site-a"])
    segments = split_model(tiny_llama(), 1, 1)
    with running_server(segments, config, certs=tmp_path / "ours") as (port, trainer):
        with pytest.raises(SplitError, match="cannot reach"):
            MiddleLink(config, "site-a", f"localhost:{port}", tmp_path / "rogue")
        with pytest.raises(SplitError, match="cannot reach"):
            MiddleLink(config, "site-a", f"localhost:{port}", None)  # no certificate at all
        # A valid certificate cannot claim another client's identity either.
        with pytest.raises(SplitError, match="certificate is for 'site-b'"):
            MiddleLink(config, "site-a", f"localhost:{port}", _as(tmp_path, "site-b"))
        assert not trainer.active()


def _as(certs: Path, real_id: str) -> Path:
    """A cert folder where client `site-a`'s files are really `real_id`'s certificate."""
    folder = certs / f"as-{real_id}"
    (folder / "clients").mkdir(parents=True)
    (folder / "ca.pem").write_bytes((certs / "ours" / "ca.pem").read_bytes())
    for suffix in ("pem", "key"):
        source = certs / "ours" / "clients" / f"{real_id}.{suffix}"
        (folder / "clients" / f"site-a.{suffix}").write_bytes(source.read_bytes())
    return folder


def test_client_with_another_config_is_refused() -> None:
    config = split_config("split.tls=false")
    segments = split_model(tiny_llama(), 1, 1)
    with running_server(segments, config) as (port, _):
        other = split_config("split.tls=false", "lora.r=4")
        with pytest.raises(SplitError, match="same model, lora, split and train"):
            MiddleLink(other, "c0", f"localhost:{port}", None)


def test_a_client_may_start_before_the_server() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    config = split_config("split.tls=false", "split.connect_timeout_s=30")
    links: list[MiddleLink] = []
    early = threading.Thread(
        target=lambda: links.append(MiddleLink(config, "c0", f"localhost:{port}", None))
    )
    early.start()
    time.sleep(1.0)  # the client is already waiting
    segments = split_model(tiny_llama(), 1, 1)
    server, _, _ = serve(
        build_trainer(segments.middle, config), config, f"127.0.0.1:{port}", None, 0
    )
    try:
        early.join(30)
        assert links, "the client gave up before the server came up"
        links[0].close()
    finally:
        server.stop(grace=None)


def test_certs_command_makes_a_usable_pki(tmp_path: Path) -> None:
    assert main(["certs", str(tmp_path / "pki"), "--clients", "a,b"]) == 0
    assert (tmp_path / "pki" / "clients" / "b.key").stat().st_mode & 0o077 == 0
    assert main(["certs", str(tmp_path / "pki"), "--clients", "a"]) == 2  # no silent overwrite


@pytest.mark.slow
def test_split_run_with_real_processes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`silotune run` with split + cenit: a server and 3 client processes over mTLS + AEAD."""
    out = tmp_path / "run"
    code = main(
        [
            "run",
            str(CONFIGS / "tiny.toml"),
            "--set",
            'experiment.algorithms=["split", "cenit"]',
            "--set",
            "model.tiny_layers=3",
            "--set",
            "train.rounds=1",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    assert "split client-1: training 3/3" in capsys.readouterr().out  # from its process
    summary = json.loads((out / "split" / "summary.json").read_text())
    assert summary["mode"] == "split" and summary["final"]["eval_loss"] > 0
    assert summary["communication"]["bytes_up"] > 0
    server = json.loads((out / "split" / "server" / "server.json").read_text())
    assert server["steps"] == 3 * 3 and len(server["clients"]) == 3
    assert all(c["finished"] and c["rejected"] == 0 for c in server["clients"].values())
    assert "cenit" in (out / "report.md").read_text()
    for path in out.rglob("*"):  # the run's TLS keys never land in its folder
        if path.is_file() and path.suffix in (".key", ".pem", ".json", ".log", ".jsonl"):
            assert b"PRIVATE KEY" not in path.read_bytes(), path
    assert not list(out.rglob("checkpoint*")), "a finished run keeps no resumable state"
    # Each client's whole trained model, as a PEFT adapter of the base model.
    for client in ("client-0", "client-1", "client-2"):
        folder = out / "split" / "adapters" / client
        config = json.loads((folder / "adapter_config.json").read_text())
        assert config["peft_type"] == "LORA" and (folder / "adapter_model.safetensors").is_file()


def prefixed_segments(config: Config) -> Segments:
    s = split_model(tiny_llama(), 1, 1)
    for role, segment in (("front", s.front), ("middle", s.middle), ("back", s.back)):
        add_segment_adapter(segment, config, role)
    return s


def test_prefix_tuning_changes_the_model_and_learns() -> None:
    config = split_config("split.adapter=prefix", "split.prefix_tokens=4")
    plain = split_model(tiny_llama(), 1, 1)
    s = prefixed_segments(config)
    assert s.front.prefix is not None and s.middle.prefix is not None
    trainable = [n for n, p in s.middle.named_parameters() if p.requires_grad]
    assert trainable and all("prefix" in n for n in trainable)  # the base stays frozen
    ids, mask, labels = batch()
    model = SplitCausalLM(s.front, s.back, s.middle)
    reference = SplitCausalLM(plain.front, plain.back, plain.middle)
    with torch.no_grad():
        assert not torch.allclose(model(ids, mask).logits, reference(ids, mask).logits)
    params = [p for m in (s.front, s.middle, s.back) for p in m.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=0.2)
    losses = []
    for _ in range(8):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses == sorted(losses, reverse=True) and losses[-1] < losses[0] - 0.05


def test_prefix_gradients_over_the_wire_match_one_process() -> None:
    config = split_config("split.adapter=prefix", "split.prefix_tokens=4", "split.tls=false")
    ids, mask, labels = batch()
    local = prefixed_segments(config)
    SplitCausalLM(local.front, local.back, local.middle)(
        input_ids=ids, attention_mask=mask, labels=labels
    ).loss.backward()
    wire = prefixed_segments(config)
    with running_server(wire, config) as (port, trainer):
        link = MiddleLink(config, "c0", f"localhost:{port}", None)
        SplitCausalLM(wire.front, wire.back, RemoteMiddle(link))(
            input_ids=ids, attention_mask=mask, labels=labels
        ).loss.backward()
        link.close()
    assert trainer.steps == 1
    for part in ("front", "back"):
        want = lora_grads(getattr(local, part))
        got = lora_grads(getattr(wire, part))
        assert want and want.keys() == got.keys()
        for name, grad in want.items():
            torch.testing.assert_close(got[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def left_padded_prompts() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(3, VOCAB, (3, 7), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # shorter prompts, padded on the left as generation wants
    mask[2, :1] = 0
    return torch.where(mask.bool(), ids, torch.zeros_like(ids)), mask


def test_split_generation_matches_the_full_model() -> None:
    """Greedy decoding with KV caches on all three segments (the server's over the wire)."""
    model = tiny_llama()
    ids, mask = left_padded_prompts()
    want = model.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0
    )
    s = split_model(model, 1, 1)
    local = SplitCausalLM(s.front, s.back, s.middle)
    kwargs = {"max_new_tokens": 6, "pad_token_id": 0, "eos_token_id": model.config.eos_token_id}
    assert torch.equal(local.generate(ids, mask, **kwargs), want)
    assert torch.equal(local.generate(ids, mask, use_cache=False, **kwargs), want)
    config = split_config("split.tls=false")
    with running_server(s, config) as (port, trainer):
        link = MiddleLink(config, "c0", f"localhost:{port}", None)
        sent: list[Frame] = []
        link.on_frame = lambda frame, raw: sent.append(frame)
        remote = SplitCausalLM(s.front, s.back, RemoteMiddle(link))
        assert torch.equal(remote.generate(ids, mask, **kwargs), want)
        link.close()
    widths = [f.tensors["hidden"].shape[1] for f in sent if f.kind == Kind.ACTIVATIONS]
    assert widths == [7, 1, 1, 1, 1, 1]  # the prompt once, then one token per step
    assert trainer.steps == 0 and not trainer.caches  # nothing trained; cache freed on leave


@pytest.mark.parametrize(
    "decoding",
    [
        {"do_sample": False, "repetition_penalty": 1.3},
        {"do_sample": True, "temperature": 0.7, "top_p": 0.9},
    ],
    ids=["greedy-repetition-penalty", "sampling"],
)
def test_split_decoding_settings_match_transformers(decoding: dict[str, object]) -> None:
    """Repetition penalty, temperature, top-k and top-p decode as transformers' generate does:
    same seed, same tokens, with the server's cache over the wire."""
    model = tiny_llama()
    ids, mask = left_padded_prompts()
    torch.manual_seed(3)
    want = model.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=8, pad_token_id=0, **decoding
    )
    s = split_model(model, 1, 1)
    config = split_config("split.tls=false")
    with running_server(s, config) as (port, _):
        link = MiddleLink(config, "c0", f"localhost:{port}", None)
        remote = SplitCausalLM(s.front, s.back, RemoteMiddle(link))
        torch.manual_seed(3)
        got = remote.generate(
            ids, mask, 8, pad_token_id=0, eos_token_id=model.config.eos_token_id, **decoding
        )
        link.close()
    assert torch.equal(got, want)
