"""PoolLayer: routing, the fused sparse row update, exact resume, the frozen-generator
guarantee."""

import pytest
import torch

import dpsn
from dpsn.errors import FreshRouterWarning
from dpsn.pool import PoolLayer, RowAdagrad, RowAdam
from dpsn.pool._layer import _ACTIVATIONS

D_IN, D_OUT = 8, 6
SMALL = {"kind": "hashed_slices", "memory_size": 2048}


def make(path, cache_rows=512, **kw):
    pool = dpsn.create(
        path, rows=10**9, dim=D_IN + D_OUT, seed=5, generator=SMALL, cache_rows=cache_rows
    )
    layer = PoolLayer(pool, D_IN, D_OUT, k=4, **kw)
    return pool, layer


def batches(n, seed=0, tokens=16):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(D_IN, D_OUT, generator=g)
    for _ in range(n):
        x = torch.randn(tokens, D_IN, generator=g)
        yield x, torch.tanh(x @ w)


def train(layer, opt, data):
    losses, used = [], []
    for x, y in data:
        loss = ((layer(x) - y) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        used.append(layer.last_route.ids[layer.last_route.mask])
    return losses, torch.unique(torch.cat(used))


def test_output_shape_and_gradients_reach_the_router(tmp_path):
    pool, layer = make(tmp_path / "s")
    x = torch.randn(2, 3, D_IN, requires_grad=True)
    y = layer(x)
    assert y.shape == (2, 3, D_OUT)
    y.square().sum().backward()
    grads = {n: p.grad for n, p in layer.named_parameters()}
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads.values()), grads.keys()
    assert x.grad is not None and x.grad.abs().sum() > 0
    pool.close()


@pytest.mark.parametrize("activation", ["gelu", "relu", "silu", "tanh"])
@pytest.mark.parametrize("budget", ["fixed", "padded"])
def test_hand_written_backward_matches_autograd(tmp_path, activation, budget, row_kernels):
    """The executor's backward (row gradients summed by sparse matmuls, no per-use tensors)
    against plain autograd in float64 over the same rows: the row updates (SGD, lr 1: the
    delta moves by minus the summed gradient), the input's gradient and the router's."""
    from dpsn.index import ProductKeyRouter

    pool = dpsn.create(tmp_path / "s", rows=300, dim=D_IN + D_OUT, seed=5, generator=SMALL)
    router = ProductKeyRouter(d_in=D_IN, num_rows=300, k=6, k_min=2 if budget == "padded" else 6)
    layer = PoolLayer(
        pool, D_IN, D_OUT, router=router, activation=activation, row_optimizer="sgd", row_lr=1.0
    )
    g = torch.Generator().manual_seed(1)
    x = torch.randn(20, D_IN, generator=g, requires_grad=True)
    c = torch.randn(20, D_OUT, generator=g)
    if budget == "padded":
        router.calibrate_budget(x.detach())
    (layer(x) * c).sum().backward()
    route = layer.last_route
    if budget == "padded":
        assert not bool(route.mask.all())  # the budget left padding to skip
    used = route.ids[route.mask].unique()
    router_grads = {n: p.grad.clone() for n, p in router.named_parameters()}
    router.zero_grad()

    rows = pool.base(used).double().requires_grad_()  # nothing was written before this step
    x_ref = x.detach().clone().requires_grad_()
    ref_route = router(x_ref)
    assert torch.equal(ref_route.ids, route.ids)
    pos = torch.searchsorted(used, torch.where(route.mask, route.ids, used[0]))
    r = rows[pos]  # (T, K, D)
    u, v = r[..., :D_IN], r[..., D_IN:]
    gates = torch.softmax(ref_route.scores.double(), dim=-1)
    act = _ACTIVATIONS[activation]
    y = torch.einsum("tk,tko->to", gates * act(torch.einsum("ti,tki->tk", x_ref.double(), u)), v)
    (y * c.double()).sum().backward()

    moved = pool.delta(used).double()  # = -lr * summed gradient
    torch.testing.assert_close(moved, -rows.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(x.grad.double(), x_ref.grad.double(), rtol=1e-4, atol=1e-5)
    for name, p in router.named_parameters():  # query projection, sub-keys (and batch norm)
        torch.testing.assert_close(router_grads[name], p.grad, rtol=1e-4, atol=1e-5, msg=name)
    pool.close()


def test_training_updates_only_used_rows_and_learns(tmp_path):
    pool, layer = make(tmp_path / "s")
    probe = torch.randint(0, 10**9, (400,))
    before = pool.read(probe).clone()
    opt = torch.optim.Adam(layer.parameters(), lr=1e-2)
    losses, used = train(layer, opt, batches(60))
    assert sum(losses[-10:]) < sum(losses[:10])
    after = pool.read(probe)
    untouched = ~torch.isin(probe, used)
    assert untouched.sum() > 200
    assert torch.equal(after[untouched], before[untouched])  # bit-identical
    assert torch.equal(pool.read(probe[untouched]), pool.base(probe[untouched]))
    assert not torch.equal(pool.delta(used), torch.zeros(len(used), D_IN + D_OUT))
    pool.close()


@pytest.mark.parametrize("row_optimizer", ["adam", "adagrad", "sgd"])
def test_resume_after_commit_matches_an_uninterrupted_run_bit_for_bit(
    tmp_path, row_optimizer, row_kernels
):
    n, m = 12, 10
    # a cache smaller than the working set, so evictions and write-backs happen too
    pool, layer = make(tmp_path / "a", cache_rows=96, row_optimizer=row_optimizer)
    opt = torch.optim.Adam(layer.parameters(), lr=1e-2)
    data = list(batches(n + m, seed=1))
    full_losses, used = train(layer, opt, data)
    assert pool.stats()["evictions"] > 0 and pool.stats()["writebacks"] > 0
    full_deltas = pool.delta(used).clone()

    pool2, layer2 = make(tmp_path / "b", cache_rows=96, row_optimizer=row_optimizer)
    opt2 = torch.optim.Adam(layer2.parameters(), lr=1e-2)
    first, _ = train(layer2, opt2, data[:n])
    layer2.commit("checkpoint")
    dense, opt_state = layer2.state_dict(), opt2.state_dict()
    pool2.close()

    pool3 = dpsn.open(tmp_path / "b", mode="r+", cache_rows=96)
    with pytest.warns(FreshRouterWarning):  # a fresh router, then the saved state over it
        layer3 = PoolLayer(pool3, D_IN, D_OUT, k=4, row_optimizer=row_optimizer)
    layer3.load_state_dict(dense)
    opt3 = torch.optim.Adam(layer3.parameters(), lr=1e-2)
    opt3.load_state_dict(opt_state)
    second, _ = train(layer3, opt3, data[n:])
    assert first + second == full_losses
    assert torch.equal(pool3.delta(used), full_deltas)
    layer3.commit("done")
    for p in (pool, pool3):
        p.close()


def test_router_is_saved_with_commits(tmp_path):
    pool, layer = make(tmp_path / "s")
    x = torch.randn(5, D_IN)
    ids = layer.router(x).ids
    layer.commit("with router")
    pool.close()
    with dpsn.open(tmp_path / "s") as r:
        assert torch.equal(r.load_router("router")(x).ids, ids)


def test_state_dict_holds_no_rows(tmp_path):
    pool, layer = make(tmp_path / "s")
    sd = layer.state_dict()
    assert sd["_extra_state"]["store"] == str(pool.path)
    tensors = {k: t for k, t in sd.items() if torch.is_tensor(t)}
    assert set(tensors) == {f"router.{k}" for k in layer.router.state_dict()}  # no rows
    other, other_layer = make(tmp_path / "t")
    with pytest.raises(ValueError, match="belongs to the store"):
        other_layer.load_state_dict(sd)
    pool.close()
    other.close()


def test_train_generator_opt_in_trains_and_commits_the_generator(tmp_path):
    pool, layer = make(tmp_path / "s", train_generator=True)
    assert any(p is pool.generator.memory for p in layer.parameters())
    opt = torch.optim.Adam(layer.parameters(), lr=1e-2)
    before = pool.generator.memory.detach().clone()
    train(layer, opt, batches(5))
    assert not torch.equal(pool.generator.memory.detach(), before)
    c = layer.commit("generator trained")
    assert c.generator == c.id
    pool.close()


def test_rows_evicted_between_forward_and_backward_are_updated_on_the_host(tmp_path):
    pool, layer = make(tmp_path / "s", cache_rows=64, row_optimizer="sgd", row_lr=0.1)
    x1, x2 = torch.randn(16, D_IN), torch.randn(16, D_IN)
    y1 = layer(x1)
    used = layer.last_route.ids[layer.last_route.mask].unique()
    layer(x2)  # the same owner pages in again: x1's rows may be evicted now
    before = pool.delta(used).clone()
    y1.square().sum().backward()
    assert not torch.equal(pool.delta(used), before)  # every used row got its update
    pool.close()


def test_rows_train_when_neither_input_nor_router_needs_grad(tmp_path):
    pool, layer = make(tmp_path / "s", row_optimizer="sgd")
    layer.router.requires_grad_(False)
    x = torch.randn(8, D_IN)  # no grad either
    y = layer(x)
    used = layer.last_route.ids[layer.last_route.mask].unique()
    y.square().sum().backward()
    assert bool((pool.delta(used) != 0).any(dim=1).all())
    pool.close()


def test_interleaved_forwards_and_backwards_each_update_their_own_rows(tmp_path, row_kernels):
    """The gathered rows' buffer is reused only once the forward that holds it has run its
    backward: a forward in between gets its own, and every backward sees its own rows. Checked
    against the same sequence with the reuse switched off."""
    results = []
    for reuse in (True, False):
        pool, layer = make(tmp_path / f"s{reuse}", row_optimizer="sgd", row_lr=0.5)
        if not reuse:
            layer._row_buffer = lambda n, table, owner: None
        xs = [torch.randn(8, D_IN, generator=torch.Generator().manual_seed(i)) for i in range(4)]
        used = []

        def forward(x, layer=layer, used=used):
            y = layer(x)
            used.append(layer.last_route.ids[layer.last_route.mask])
            return y.square().sum()

        loss0 = forward(xs[0])
        loss0.backward()  # releases the buffer: the next forward reuses it
        loss1, loss2 = forward(xs[1]), forward(xs[2])  # 2 cannot take 1's buffer
        loss2.backward()
        loss3 = forward(xs[3])  # nor can 3: 1 still holds it
        loss1.backward()
        loss3.backward()
        ids = torch.cat(used).unique()
        results.append((ids, pool.delta(ids)))
        pool.close()
    assert torch.equal(results[0][0], results[1][0])
    assert torch.equal(results[0][1], results[1][1])
    assert bool((results[0][1] != 0).any())


def test_a_second_backward_after_the_rows_were_reused_is_refused(tmp_path):
    pool, layer = make(tmp_path / "s", row_optimizer="sgd")
    y1 = layer(torch.randn(8, D_IN))
    y1.sum().backward(retain_graph=True)
    layer(torch.randn(8, D_IN))  # reuses the buffer y1's graph gathered into
    with pytest.raises(RuntimeError, match=r"reused by a later forward|second backward"):
        y1.sum().backward()
    pool.close()


def test_a_dropped_graph_frees_the_gathered_rows(tmp_path):
    pool, layer = make(tmp_path / "s")
    layer(torch.randn(8, D_IN))  # grad on, never run backward: the graph is dropped
    owner = type("Owner", (), {})()  # a stand-in for the next forward's autograd node
    assert layer._row_buffer(1, torch.empty(1, D_IN + D_OUT), owner) is not None
    pool.close()


def test_autocast_bfloat16(tmp_path):
    pool, layer = make(tmp_path / "s")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(torch.randn(4, D_IN))
    y.float().sum().backward()
    pool.close()


def test_bad_configuration(tmp_path):
    pool = dpsn.create(tmp_path / "s", rows=100, dim=10, generator=SMALL)
    with pytest.raises(ValueError, match="must be 14"):
        PoolLayer(pool, D_IN, D_OUT)
    with pytest.raises(ValueError, match="expected inputs"):
        PoolLayer(pool, 4, 6, k=2)(torch.randn(3, 5))
    pool.close()


def test_row_optimizers_follow_their_formulas(row_kernels):
    delta, grad = torch.zeros(2, 3), torch.tensor([[1.0, 2, 3], [0, 0, 1]])
    new, state = RowAdagrad(lr=0.5).step(delta, grad, torch.zeros(2, 1))
    g2 = grad.pow(2).mean(1, keepdim=True)
    assert torch.allclose(new, -0.5 * grad / g2.sqrt()) and torch.allclose(state, g2)
    adam = RowAdam(lr=0.1)
    new, state = adam.step(delta, grad, torch.zeros(2, 5))
    # first Adam step: m_hat = g, v_hat = mean(g^2)
    assert torch.allclose(new, -0.1 * grad / (g2.sqrt() + 1e-8), atol=1e-6)
    assert torch.equal(state[:, 4], torch.ones(2))


@pytest.mark.parametrize("name", ["sgd", "adagrad", "adam"])
def test_native_row_steps_match_the_pytorch_formulas(name, monkeypatch):
    """The fused loops (dpsn._native) and the PyTorch formulas agree over many steps."""
    from dpsn import _kernels
    from dpsn.tiers import make_row_optimizer

    if _kernels._lib is None:
        pytest.skip("dpsn._native was not built")
    opt = make_row_optimizer(name, lr=0.05)
    g = torch.Generator().manual_seed(0)
    dim = 24
    paths = {}
    for native in (True, False):
        monkeypatch.setattr(_kernels, "ENABLED", native)
        delta, state = torch.zeros(5, dim), torch.zeros(5, opt.state_width(dim))
        g.manual_seed(0)
        for _ in range(20):
            grad = torch.randn(5, dim, generator=g)
            delta, state = opt.step(delta, grad, state)
        paths[native] = (delta, state)
    assert torch.allclose(paths[True][0], paths[False][0], rtol=1e-5, atol=1e-6)
    assert torch.allclose(paths[True][1], paths[False][1], rtol=1e-5, atol=1e-6)


def test_a_subclass_with_its_own_step_is_not_fused():
    class Halved(RowAdagrad):
        def step(self, delta, grad, state):
            return super().step(delta, grad * 0.5, state)

    assert RowAdagrad.native is not None and Halved.native is None
