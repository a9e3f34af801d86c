"""Backend dispatch, argument validation, optional imports (triton, flash-attn)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from _kernel_cases import DEVICE, ragged_cache

import gatekv.kernels as kernels
from gatekv.kernels import dispatch, reference


@pytest.fixture(autouse=True)
def _restore_backend():
    yield
    dispatch._backend = "auto"


def _small_cache(dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    cache = ragged_cache([5, 0, 9, 3], [8, 2, 9, 4], 16, 16, dtype, gen)
    query = torch.randn(2, 4, 1, 16, generator=gen).to(dtype).to(DEVICE)
    query_positions = torch.tensor([[30], [30]], device=DEVICE)
    return query, query_positions, cache


def _attention_args(query, query_positions, cache):
    return (query, query_positions, cache["keys"], cache["values"], cache["positions"], cache["starts"],
            cache["lengths"], 0.25)


def test_set_backend_names():
    assert kernels.get_backend() == "auto"
    kernels.set_backend("reference")
    assert kernels.get_backend() == "reference"
    with pytest.raises(ValueError, match="'cudnn'"):
        kernels.set_backend("cudnn")


def test_flash_backend_needs_flash_attn():
    from gatekv.kernels import flash

    if flash.is_available():
        pytest.skip("flash-attn is installed")
    with pytest.raises(ValueError, match="flash-attn"):
        kernels.set_backend("flash")


def _spy(monkeypatch, name):
    tk = pytest.importorskip("gatekv.kernels.triton_kernels")
    calls = []
    original = getattr(tk, name)

    def spy(*args, **kwargs):
        calls.append(name)
        return original(*args, **kwargs)

    monkeypatch.setattr(tk, name, spy)
    return calls


def test_auto_picks_triton_under_the_interpreter_and_reference_otherwise(monkeypatch):
    pytest.importorskip("triton")
    query, query_positions, cache = _small_cache()
    args = _attention_args(query, query_positions, cache)
    expected = reference.ragged_attention_reference(*args)
    calls = _spy(monkeypatch, "ragged_attention")
    torch.testing.assert_close(kernels.ragged_attention(*args), expected, atol=1e-5, rtol=1e-5)
    assert calls == ["ragged_attention"]  # CUDA, or CPU with TRITON_INTERPRET=1 (conftest)
    if DEVICE.type == "cpu":
        monkeypatch.delenv("TRITON_INTERPRET")
        kernels.ragged_attention(*args)
        assert calls == ["ragged_attention"]  # CPU without the interpreter: reference
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    kernels.set_backend("reference")
    kernels.ragged_attention(*args)
    assert calls == ["ragged_attention"]
    kernels.set_backend("triton")
    kernels.ragged_attention(*args)
    assert calls == ["ragged_attention"] * 2


def test_auto_sends_every_function_to_triton(monkeypatch):
    pytest.importorskip("triton")
    names = ["compact", "append", "window_attention", "column_max_logits"]
    calls = {name: _spy(monkeypatch, name) for name in names}
    query, query_positions, cache = _small_cache()
    counts = torch.tensor([2, 0, 3, 1], device=DEVICE)
    indices = torch.tensor([[0, 4, 0], [0, 0, 0], [1, 2, 8], [2, 0, 0]], device=DEVICE)
    out = kernels.compact([cache["keys"], cache["positions"]], cache["starts"], indices, counts,
                          torch.tensor([0, 2, 2, 5], device=DEVICE), 7, [0, -1])
    expected = reference.compact_reference([cache["keys"], cache["positions"]], cache["starts"], indices, counts,
                                           torch.tensor([0, 2, 2, 5], device=DEVICE), 7, [0, -1])
    assert all(torch.equal(a, b) for a, b in zip(out, expected))
    new = torch.randn(4, 1, 16, device=DEVICE)
    lengths = torch.tensor([5, 0, 8, 3], device=DEVICE)
    kernels.append([cache["keys"]], cache["starts"], lengths, [new])
    assert torch.equal(cache["keys"][cache["starts"] + lengths], new[:, 0])
    dense_keys = torch.randn(2, 2, 20, 16, device=DEVICE)
    dense_pos = torch.arange(20, device=DEVICE).repeat(2, 2, 1)
    kernels.window_attention(query, query_positions, dense_keys, dense_pos, 0.25)
    kernels.column_max_logits(query, query_positions, dense_keys, dense_pos, 0.25)
    assert all(calls[name] == [name] for name in names)


def test_import_without_triton_uses_the_reference():
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, gatekv.kernels as k\n"
        "from gatekv.kernels import dispatch\n"
        "out = k.compact([torch.arange(6.)], torch.tensor([0, 3]), torch.tensor([[2], [0]]), torch.tensor([1, 1]),"
        " torch.tensor([0, 1]), 2)\n"
        "assert out[0].tolist() == [2.0, 3.0], out\n"
        "assert dispatch._triton_kernels is None\n"
        "try:\n    k.set_backend('triton')\nexcept ValueError as e:\n    print('refused:', e)\n"
    )
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "refused: kernel backend 'triton' needs the triton package" in result.stdout


@pytest.mark.gpu
def test_flash_backend_matches_reference():
    pytest.importorskip("flash_attn")
    from gatekv.kernels import flash

    if not (torch.cuda.is_available() and flash.is_available()):
        pytest.skip("needs CUDA and flash-attn >= 2.6")
    gen = torch.Generator().manual_seed(0)
    cache = ragged_cache([500, 0, 37, 300], [512, 16, 64, 300], 128, 128, torch.bfloat16, gen, holes=False)
    query = torch.randn(2, 8, 1, 128, generator=gen).bfloat16().to(DEVICE)
    query_positions = torch.tensor([[2000], [2000]], device=DEVICE)
    args = _attention_args(query, query_positions, cache)
    assert flash.supports(query, cache["keys"], cache["values"], None)
    got = flash.ragged_attention(*args)
    assert got is not None
    expected = reference.ragged_attention_reference(*args)
    torch.testing.assert_close(got.float(), expected.float(), atol=1.6e-2, rtol=1.6e-2)
    # a slot the query may not see: flash-attn does not apply, the dispatch falls back
    cache["positions"][0] = 5000
    assert flash.ragged_attention(*_attention_args(query, query_positions, cache)) is None


# ------------------------------------------------------------------------------------------------------------
# validation: ValueError naming the argument, for every backend
# ------------------------------------------------------------------------------------------------------------

BACKENDS = ["reference", pytest.param("triton", marks=pytest.mark.skipif(
    __import__("importlib").util.find_spec("triton") is None, reason="triton not installed"))]


def _bad_attention_calls(query, query_positions, cache):
    keys, values, positions = cache["keys"], cache["values"], cache["positions"]
    starts, lengths = cache["starts"], cache["lengths"]
    meta_keys = torch.empty(keys.shape, device="meta")
    return [
        ("query", (query[0], query_positions, keys, values, positions, starts, lengths, 0.25)),
        ("query", (query.long(), query_positions, keys, values, positions, starts, lengths, 0.25)),
        ("query_positions", (query, query_positions.float(), keys, values, positions, starts, lengths, 0.25)),
        ("keys", (query, query_positions, keys[:, :8], values, positions, starts, lengths, 0.25)),
        ("keys", (query, query_positions, meta_keys, values, positions, starts, lengths, 0.25)),
        ("values", (query, query_positions, keys, values[:-1], positions, starts, lengths, 0.25)),
        ("positions", (query, query_positions, keys, values, positions.float(), starts, lengths, 0.25)),
        ("lengths", (query, query_positions, keys, values, positions, starts, lengths[:-1], 0.25)),
        ("starts", (query, query_positions, keys, values, positions, starts[:3], lengths[:3], 0.25)),
        ("scale", (query, query_positions, keys, values, positions, starts, lengths, "0.25")),
        ("sliding_window", (query, query_positions, keys, values, positions, starts, lengths, 0.25, 0)),
    ]


@pytest.mark.parametrize("backend", BACKENDS)
def test_ragged_attention_rejects_bad_arguments(backend):
    kernels.set_backend(backend)
    query, query_positions, cache = _small_cache()
    for name, args in _bad_attention_calls(query, query_positions, cache):
        with pytest.raises(ValueError, match=rf"\b{name}\b"):
            kernels.ragged_attention(*args)


@pytest.mark.parametrize("backend", BACKENDS)
def test_compact_and_append_reject_bad_arguments(backend):
    kernels.set_backend(backend)
    _, _, cache = _small_cache()
    keys, positions, starts = cache["keys"], cache["positions"], cache["starts"]
    counts = torch.tensor([1, 0, 1, 1], device=DEVICE)
    indices = torch.zeros(4, 2, dtype=torch.int64, device=DEVICE)
    good = ([keys, positions], starts, indices, counts, starts, 10, None)
    bad = [
        ("src", ([],) + good[1:]),
        (r"src\[1\]", ([keys, torch.empty(positions.shape, device="meta")],) + good[1:]),
        ("indices", good[:2] + (indices[:3],) + good[3:]),
        ("indices", good[:2] + (indices.float(),) + good[3:]),
        ("counts", good[:3] + (counts[:2],) + good[4:]),
        ("dst_starts", good[:4] + (starts.float(),) + good[5:]),
        ("dst_rows", good[:5] + (-1, None)),
        ("dst_rows", good[:5] + (2.5, None)),
        ("fill", good[:6] + ([0],)),
    ]
    for name, args in bad:
        with pytest.raises(ValueError, match=rf"\b{name}"):
            kernels.compact(*args)
    lengths = torch.tensor([1, 0, 2, 1], device=DEVICE)
    new = [torch.randn(4, 1, 16, device=DEVICE), torch.zeros(4, 1, dtype=torch.int64, device=DEVICE)]
    bad = [
        ("dst", ([], starts, lengths, [])),
        ("new", ([keys, positions], starts, lengths, new[:1])),
        (r"new\[0\]", ([keys, positions], starts, lengths, [new[0][:, :, :8], new[1]])),
        (r"new\[1\]", ([keys, positions], starts, lengths, [new[0], new[1].float()])),
        (r"new\[0\]", ([keys, positions], starts, lengths, [new[0].to("meta"), new[1]])),
        ("lengths", ([keys, positions], starts, lengths.float(), new)),
        ("starts", ([keys, positions], starts[:3], lengths, new)),
    ]
    for name, args in bad:
        with pytest.raises(ValueError, match=rf"\b{name}"):
            kernels.append(*args)


@pytest.mark.parametrize("backend", BACKENDS)
def test_reductions_reject_bad_arguments(backend):
    kernels.set_backend(backend)
    queries = torch.randn(2, 4, 3, 16, device=DEVICE)
    qpos = torch.zeros(2, 3, dtype=torch.int64, device=DEVICE)
    keys = torch.randn(2, 2, 10, 16, device=DEVICE)
    kpos = torch.zeros(2, 2, 10, dtype=torch.int64, device=DEVICE)
    bad = [
        ("queries", (queries[:, :3], qpos, keys, kpos, 0.1)),  # H_q = 3 not a multiple of H_kv = 2
        ("query_positions", (queries, qpos[:, :2], keys, kpos, 0.1)),
        ("keys", (queries, qpos, keys[..., :8], kpos, 0.1)),
        ("keys", (queries, qpos, keys.to("meta"), kpos, 0.1)),
        ("key_positions", (queries, qpos, keys, kpos.float(), 0.1)),
        ("key_positions", (queries, qpos, keys, kpos[:, :, :5], 0.1)),
        ("scale", (queries, qpos, keys, kpos, None)),
    ]
    for name, args in bad:
        if name == "queries":
            name = "keys"  # the GQA ratio is reported on keys (H_kv must divide H_q)
        with pytest.raises(ValueError, match=rf"\b{name}\b"):
            kernels.column_max_logits(*args)
        window_name = {"queries": "window_queries", "query_positions": "window_positions"}.get(name, name)
        with pytest.raises(ValueError, match=rf"\b{window_name}\b"):
            kernels.window_attention(*args)
    with pytest.raises(ValueError, match="key_positions"):  # (B, T) positions: column max only
        kernels.window_attention(queries, qpos, keys, kpos[:, 0], 0.1)


def test_triton_functions_reject_cpu_tensors_without_the_interpreter():
    tk = pytest.importorskip("gatekv.kernels.triton_kernels")
    if tk._INTERPRETED:
        pytest.skip("the interpreter takes CPU tensors")
    query, query_positions, cache = _small_cache()
    cpu_cache = {name: tensor.cpu() for name, tensor in cache.items()}
    with pytest.raises(ValueError, match="query"):
        tk.ragged_attention(*_attention_args(query.cpu(), query_positions.cpu(), cpu_cache))


@pytest.mark.parametrize("backend", BACKENDS)
def test_unmasked_decode_with_host_layout(backend):
    """``unmasked`` (every filled slot visible) and ``host_layout`` change the path, not the result."""
    kernels.set_backend(backend)
    gen = torch.Generator().manual_seed(2)
    cache = ragged_cache([5, 0, 9, 3], [8, 2, 9, 4], 16, 16, torch.float32, gen, holes=False)
    query = torch.randn(2, 4, 1, 16, generator=gen).to(DEVICE)
    args = _attention_args(query, torch.tensor([[30], [30]], device=DEVICE), cache)
    layout = (cache["starts"].tolist(), cache["lengths"].tolist())
    got = kernels.ragged_attention(*args, unmasked=True, host_layout=layout)
    torch.testing.assert_close(got, reference.ragged_attention_reference(*args), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="host_layout"):
        kernels.ragged_attention(*args, host_layout=(layout[0], layout[1][:2]))
