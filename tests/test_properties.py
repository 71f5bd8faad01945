"""Property-based soundness: random MLP and CNN architectures (widths, residual adds,
concatenations, splits, norms, head-style reshapes, flattens, activations), transformers, and
slices picked through random views always get a sound spec: ``lint`` passes and a random
permutation of every group keeps the outputs.

Each architecture is a plain list of block descriptions drawn by hypothesis and built by
a small interpreter module, so a failing example prints as a readable recipe.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch import nn

from tests.helpers import assert_sound

# The profile comes from tests/conftest.py: "default" (derandomized, 25 examples, the same
# every run) or "long" (HYPOTHESIS_PROFILE=long: random, 10x the examples, new ones each run).
SETTINGS = settings(max_examples=settings.default.max_examples)
TRANSFORMER_SETTINGS = settings(max_examples=max(1, settings.default.max_examples // 2))

ACTS = {
    "relu": F.relu,
    "gelu": F.gelu,
    "silu": F.silu,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "hardswish": F.hardswish,
    "leaky_relu": lambda t: F.leaky_relu(t, 0.1),
    "identity": lambda t: t,
}
act_names = st.sampled_from(sorted(ACTS))


def _assert_round_trip(spec, model: nn.Module) -> None:
    """apply(p) then apply(inverse(p)) gives the state_dict back bit for bit."""
    state = model.state_dict()
    perm = spec.random_permutation(torch.Generator().manual_seed(2))
    back = spec.apply(spec.inverse(perm), spec.apply(perm, state))
    assert back.keys() == state.keys()
    assert all(torch.equal(back[k], state[k]) for k in state)

# --------------------------------------------------------------------------------------
# MLPs over the last dim


def _vec_norm(kind: str, width: int, rank: int) -> nn.Module:
    if kind == "ln":
        return nn.LayerNorm(width)
    if kind == "rms":
        return nn.RMSNorm(width)
    if kind == "bn" and rank == 2:
        return nn.BatchNorm1d(width)
    return nn.Identity()


class RandomMLP(nn.Module):
    """Runs a recipe of blocks over features in the last dim of a [B, in] or [B, T, in] input."""

    def __init__(self, in_dim: int, rank: int, blocks: list[tuple], out_dim: int):
        super().__init__()
        self.recipe = blocks
        self.rank = rank
        self.layers = nn.ModuleList()
        width = in_dim
        for blk in blocks:
            kind = blk[0]
            m = nn.ModuleDict()
            if kind == "linear":
                _, w, _, bias = blk
                m["fc"] = nn.Linear(width, w, bias=bias)
                width = w
            elif kind == "residual":
                _, hidden, _, norm = blk
                m["norm"] = _vec_norm(norm, width, rank)
                m["up"] = nn.Linear(width, hidden)
                m["down"] = nn.Linear(hidden, width)
            elif kind == "concat":
                _, w1, w2, _ = blk
                m["l"], m["r"] = nn.Linear(width, w1), nn.Linear(width, w2)
                width = w1 + w2
            elif kind == "split":
                _, cut, w, _ = blk
                cut = 1 + cut % (width - 1) if width > 1 else 0
                m["l"], m["r"] = nn.Linear(cut, w), nn.Linear(width - cut, w)
                width = w
            elif kind == "norm":
                m["norm"] = _vec_norm(blk[1], width, rank)
            elif kind == "heads":
                _, heads, _ = blk
                if width % heads == 0:
                    m["head_norm"] = nn.LayerNorm(width // heads)
                    self.register_parameter(f"gain{len(self.layers)}", nn.Parameter(torch.randn(heads, 1)))
            self.layers.append(m)
        self.out = nn.Linear(width, out_dim)

    def forward(self, x):
        h = x
        for i, (blk, m) in enumerate(zip(self.recipe, self.layers)):
            kind = blk[0]
            if kind == "linear":
                h = ACTS[blk[2]](m["fc"](h))
            elif kind == "residual":
                h = h + m["down"](ACTS[blk[2]](m["up"](m["norm"](h))))
            elif kind == "concat":
                h = torch.cat([ACTS[blk[3]](m["l"](h)), torch.tanh(m["r"](h))], dim=-1)
            elif kind == "split":
                cut = m["l"].in_features
                u, v = h.split([cut, h.shape[-1] - cut], dim=-1)
                h = ACTS[blk[3]](m["l"](u) + m["r"](v))
            elif kind == "norm":
                h = m["norm"](h)
            elif kind == "heads" and "head_norm" in m:
                heads = blk[1]
                shaped = h.unflatten(-1, (heads, h.shape[-1] // heads))
                shaped = m["head_norm"](shaped) * getattr(self, f"gain{i}")
                h = ACTS[blk[2]](shaped.flatten(-2))
        return self.out(h)


widths = st.integers(2, 12)
mlp_block = st.one_of(
    st.tuples(st.just("linear"), widths, act_names, st.booleans()),
    st.tuples(st.just("residual"), widths, act_names, st.sampled_from(["none", "ln", "rms", "bn"])),
    st.tuples(st.just("concat"), st.integers(1, 6), st.integers(1, 6), act_names),
    st.tuples(st.just("split"), st.integers(0, 10), widths, act_names),
    st.tuples(st.just("norm"), st.sampled_from(["ln", "rms", "bn"])),
    st.tuples(st.just("heads"), st.sampled_from([2, 3, 4]), act_names),
)


@SETTINGS
@given(
    in_dim=st.integers(2, 6),
    rank=st.sampled_from([2, 3]),
    blocks=st.lists(mlp_block, min_size=1, max_size=5),
    out_dim=st.integers(1, 4),
)
def test_random_mlp_is_sound(in_dim, rank, blocks, out_dim):
    torch.manual_seed(0)
    model = RandomMLP(in_dim, rank, blocks, out_dim)
    shape = (4, in_dim) if rank == 2 else (2, 3, in_dim)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    spec = assert_sound(model, x, min_groups=0, seeds=(0,))
    _assert_round_trip(spec, model)


# --------------------------------------------------------------------------------------
# CNNs


def _chan_norm(kind: str, c: int, size: int) -> nn.Module:
    if kind == "bn":
        return nn.BatchNorm2d(c)
    if kind == "gn":
        return nn.GroupNorm(next(g for g in (4, 3, 2, 1) if c % g == 0), c)
    if kind == "in" and size > 1:  # instance norm needs more than one position
        return nn.InstanceNorm2d(c, affine=True)
    return nn.Identity()


class RandomCNN(nn.Module):
    def __init__(self, size: int, blocks: list[tuple], head: str, out_dim: int):
        super().__init__()
        self.recipe, self.head_kind = blocks, head
        self.layers = nn.ModuleList()
        c, s = 3, size
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        c = 4
        for blk in blocks:
            kind = blk[0]
            m = nn.ModuleDict()
            if kind == "conv":
                _, w, k, stride, groups, norm, _ = blk
                g = groups if c % groups == 0 and w % groups == 0 else 1
                stride = stride if s >= 4 else 1
                m["conv"] = nn.Conv2d(c, w, k, stride=stride, padding=k // 2, groups=g)
                c, s = w, (s + 2 * (k // 2) - k) // stride + 1
                m["norm"] = _chan_norm(norm, w, s)
            elif kind == "residual":
                _, hidden, norm, _ = blk
                m["c1"] = nn.Conv2d(c, hidden, 3, padding=1)
                m["n1"] = _chan_norm(norm, hidden, s)
                m["c2"] = nn.Conv2d(hidden, c, 1)
            elif kind == "dense":
                _, grow, norm = blk
                m["norm"] = _chan_norm(norm, c, s)
                m["conv"] = nn.Conv2d(c, grow, 3, padding=1)
                c += grow
            elif kind == "depthwise":
                _, mult, _ = blk
                m["dw"] = nn.Conv2d(c, c * mult, 3, padding=1, groups=c)
                c *= mult
            elif kind == "se":
                _, r = blk
                m["f1"], m["f2"] = nn.Linear(c, r), nn.Linear(r, c)
            elif kind == "pool":
                if s >= 2:
                    s //= 2
            self.layers.append(m)
        if head == "gap":
            self.fc = nn.Linear(c, out_dim)
        elif head == "flatten":
            self.fc = nn.Linear(c * s * s, out_dim)
        else:  # adaptive pool to 2x2 then flatten
            self.fc = nn.Linear(c * 4, out_dim)

    def forward(self, x):
        h = F.relu(self.stem(x))
        for blk, m in zip(self.recipe, self.layers):
            kind = blk[0]
            if kind == "conv":
                h = ACTS[blk[-1]](m["norm"](m["conv"](h)))
            elif kind == "residual":
                h = F.relu(h + m["c2"](ACTS[blk[-1]](m["n1"](m["c1"](h)))))
            elif kind == "dense":
                h = torch.cat([h, F.relu(m["conv"](F.relu(m["norm"](h))))], dim=1)
            elif kind == "depthwise":
                h = ACTS[blk[-1]](m["dw"](h))
            elif kind == "se":
                z = torch.sigmoid(m["f2"](F.relu(m["f1"](h.mean((2, 3))))))
                h = h * z[:, :, None, None]
            elif kind == "pool" and h.shape[-1] >= 2:
                h = F.max_pool2d(h, 2) if blk[1] == "max" else F.avg_pool2d(h, 2)
        if self.head_kind == "gap":
            return self.fc(h.mean((2, 3)))
        if self.head_kind == "flatten":
            return self.fc(h.flatten(1))
        return self.fc(F.adaptive_avg_pool2d(h, 2).flatten(1))


norms = st.sampled_from(["none", "bn", "gn", "in"])
cnn_block = st.one_of(
    st.tuples(st.just("conv"), st.integers(2, 10), st.sampled_from([1, 3]), st.sampled_from([1, 2]),
              st.sampled_from([1, 2, 4]), norms, act_names),
    st.tuples(st.just("residual"), st.integers(2, 8), norms, act_names),
    st.tuples(st.just("dense"), st.integers(1, 4), norms),
    st.tuples(st.just("depthwise"), st.sampled_from([1, 2]), act_names),
    st.tuples(st.just("se"), st.integers(1, 4)),
    st.tuples(st.just("pool"), st.sampled_from(["max", "avg"])),
)


@SETTINGS
@given(
    size=st.sampled_from([4, 6, 8]),
    blocks=st.lists(cnn_block, min_size=1, max_size=4),
    head=st.sampled_from(["gap", "flatten", "adaptive"]),
    out_dim=st.integers(1, 3),
)
def test_random_cnn_is_sound(size, blocks, head, out_dim):
    torch.manual_seed(0)
    model = RandomCNN(size, blocks, head, out_dim)
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    spec = assert_sound(model, x, min_groups=0, seeds=(0,))
    _assert_round_trip(spec, model)


# --------------------------------------------------------------------------------------
# transformer blocks


class RandomTransformer(nn.Module):
    """Token embedding, ``layers`` pre-norm blocks (attention with H heads, optional fused
    qkv, grouped-query heads, causal mask; then a plain or gated MLP), a final norm and a
    head, optionally tied to the embedding."""

    def __init__(self, heads: int, head_dim: int, kv_div: int, layers: int, fused: bool, causal: bool,
                 gated: bool, norm: str, tied: bool, vocab: int = 11):
        super().__init__()
        E = heads * head_dim
        self.H, self.D, self.KV = heads, head_dim, heads // kv_div
        self.fused, self.causal, self.gated = fused, causal, gated
        norm_cls = nn.LayerNorm if norm == "ln" else nn.RMSNorm
        self.emb = nn.Embedding(vocab, E)
        self.blocks = nn.ModuleList()
        kv = self.KV * head_dim
        for _ in range(layers):
            b = nn.ModuleDict({"n1": norm_cls(E), "n2": norm_cls(E), "o": nn.Linear(E, E)})
            if fused:
                b["qkv"] = nn.Linear(E, E + 2 * kv)
            else:
                b["q"], b["k"], b["v"] = nn.Linear(E, E), nn.Linear(E, kv), nn.Linear(E, kv)
            b["up"] = nn.Linear(E, 2 * E * (2 if gated else 1))
            b["down"] = nn.Linear(2 * E, E)
            self.blocks.append(b)
        self.norm = norm_cls(E)
        self.head = nn.Linear(E, vocab, bias=False)
        if tied:
            self.head.weight = self.emb.weight

    def forward(self, ids):
        x = self.emb(ids)
        B, T, E = x.shape
        for b in self.blocks:
            h = b["n1"](x)
            if self.fused:
                q, k, v = b["qkv"](h).split([E, self.KV * self.D, self.KV * self.D], dim=-1)
            else:
                q, k, v = b["q"](h), b["k"](h), b["v"](h)
            q = q.view(B, T, self.H, self.D).transpose(1, 2)
            k = k.view(B, T, self.KV, self.D).transpose(1, 2)
            v = v.view(B, T, self.KV, self.D).transpose(1, 2)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal, enable_gqa=self.KV != self.H)
            x = x + b["o"](y.transpose(1, 2).reshape(B, T, E))
            u = b["up"](b["n2"](x))
            if self.gated:
                g, u = u.chunk(2, dim=-1)
                u = F.silu(g) * u
            else:
                u = F.gelu(u)
            x = x + b["down"](u)
        return self.head(self.norm(x))


@TRANSFORMER_SETTINGS
@given(
    heads=st.sampled_from([2, 4]),
    head_dim=st.sampled_from([2, 3, 4]),
    kv_div=st.sampled_from([1, 2]),
    layers=st.integers(1, 2),
    fused=st.booleans(),
    causal=st.booleans(),
    gated=st.booleans(),
    norm=st.sampled_from(["ln", "rms"]),
    tied=st.booleans(),
)
def test_random_transformer_is_sound(heads, head_dim, kv_div, layers, fused, causal, gated, norm, tied):
    torch.manual_seed(0)
    model = RandomTransformer(heads, head_dim, kv_div, layers, fused, causal, gated, norm, tied)
    ids = torch.randint(0, 11, (2, 5), generator=torch.Generator().manual_seed(1))
    spec = assert_sound(model, ids, min_groups=1 + layers, seeds=(0,))
    _assert_round_trip(spec, model)
    # the residual stream is one group of E units through every block
    E = heads * head_dim
    stream = [g for g in spec.groups if any(m.key == "emb.weight" and m.axis == 1 for m in g.members)]
    assert len(stream) == 1 and stream[0].size == E, spec


# --------------------------------------------------------------------------------------
# slices picked through views


class RandomPicks(nn.Module):
    """A linear's ``p0 * p1 * p2`` units viewed as ``[B, p0, p1, p2]``, its dims permuted,
    optionally made contiguous, then every slice along one non-batch dim picked (by
    ``unbind``, by ``select``, or by indexing) and read by a linear of its own; ``reduce``
    gives the viewed tensor one more user, a sum, which is no pick."""

    def __init__(self, sizes: tuple[int, int, int], order: tuple[int, ...], pick_at: int, how: str,
                 contiguous: bool, reduce: bool):
        super().__init__()
        self.sizes, self.order, self.how, self.contiguous, self.reduce = sizes, order, how, contiguous, reduce
        self.a = nn.Linear(3, sizes[0] * sizes[1] * sizes[2])
        self.batch_at = order.index(0)
        self.pick_at = [d for d in range(4) if d != self.batch_at][pick_at]
        width = sizes[0] * sizes[1] * sizes[2]
        n = (1, *sizes)[order[self.pick_at]]
        self.b = nn.ModuleList(nn.Linear(width // n, 2) for _ in range(n))
        self.c = nn.Linear(width // n, 2)

    def forward(self, x):
        h = F.relu(self.a(x)).view(-1, *self.sizes).permute(*self.order)
        if self.contiguous:
            h = h.contiguous()
        n = h.shape[self.pick_at]
        if self.how == "unbind":
            slices = h.unbind(self.pick_at)
        elif self.how == "select":
            slices = [h.select(self.pick_at, i) for i in range(n)]
        else:
            slices = [h[(slice(None),) * self.pick_at + (i,)] for i in range(n)]
        batch_at = self.batch_at - (self.batch_at > self.pick_at)
        out = sum(b(s.movedim(batch_at, 0).reshape(s.shape[batch_at], -1)) for b, s in zip(self.b, slices))
        if self.reduce:
            out = out + self.c(h.sum(self.pick_at).movedim(batch_at, 0).reshape(x.shape[0], -1))
        return out


@SETTINGS
@example(sizes=(3, 2, 2), order=[0, 1, 2, 3], pick_at=0, how="unbind", contiguous=False, reduce=False)
@example(sizes=(2, 3, 2), order=[2, 0, 3, 1], pick_at=2, how="index", contiguous=True, reduce=False)
@given(
    sizes=st.tuples(st.integers(1, 3), st.integers(1, 3), st.integers(2, 3)),
    order=st.permutations([0, 1, 2, 3]),
    pick_at=st.integers(0, 2),
    how=st.sampled_from(["unbind", "select", "index"]),
    contiguous=st.booleans(),
    reduce=st.booleans(),
)
def test_random_picks_through_views_are_sound(sizes, order, pick_at, how, contiguous, reduce):
    torch.manual_seed(0)
    model = RandomPicks(sizes, tuple(order), pick_at, how, contiguous, reduce)
    spec = assert_sound(model, torch.randn(5, 3, generator=torch.Generator().manual_seed(1)), min_groups=0)
    _assert_round_trip(spec, model)
    # picking along the outermost factor cuts the units into contiguous runs: each run moves
    # on its own (a.weight members start at every run), unless the sum reads them all alike
    if model.order[model.pick_at] == 1 and sizes[0] > 1 and not reduce:
        run = sizes[1] * sizes[2]
        starts = {m.layout.offset for g in spec.groups for m in g.members if m.key == "a.weight"}
        assert starts >= {i * run for i in range(sizes[0])}, spec
