"""The any-model engine (positnn.engine): every op of a converted model in its stage.

1. Bit-exact references: forward outputs, input gradients and parameter gradients of a
   residual block, a LayerNorm, F.linear in a custom forward (also against
   positnn.nn.Linear), an attention head, a GELU MLP and a tied embedding head
   equal compositions of positnn.quire and Posit calls written out here, under a policy of
   four different formats (F posit(8,2), B posit(10,1), G posit(12,2), O = L posit(16,2)),
   so that a stage mix-up cannot go unnoticed. Upstream gradients come from
   ``y.backward(gy)`` (nothing announced: parameter gradients are not divided).
2. A float32 policy is torch: outputs and gradients of a ResNet-18-shaped model and of a
   GPT block; gradcheck in float64 of a converted model under an all-float policy.
3. Every intermediate of a posit8 forward is a posit(8,2) value (bit-exact membership).
4. Training: tied weights stay one parameter in O; torch's cross entropy, a custom loss
   and positnn's loss all learn; gradient accumulation matches one big batch.
5. Ops without posit semantics raise UnsupportedOpError naming the op and the module.
6. ResNet and other layer coverage in posits.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as TF
from torch import nn

import positnn.nn as pnn
import positnn.optim as poptim
from positnn import Posit, quire
from positnn.convert import convert
from positnn.engine import UnsupportedOpError
from positnn.engine import mode as engine_mode
from positnn.policy import Policy

P8, P10, P12, P16 = Posit(8, 2), Posit(10, 1), Posit(12, 2), Posit(16, 2)
F, B, G, O = P8, P10, P12, P16
# Four different formats, so a stage mix-up cannot go unnoticed.
MIXED = Policy(forward=F, backward=B, gradient=G, optimizer=O, loss=P16, quire="exact")
F64 = torch.float64
aten = torch.ops.aten


def scalar(fmt: Posit, v: float) -> float:
    """A constant as the stage holds it (the engine rounds scalar operands to the stage)."""
    return float(fmt.round(torch.tensor(float(v), dtype=F64)))


def is_posit(t: torch.Tensor, fmt: Posit, masks: bool = False) -> bool:
    """Every element of t is a value of fmt (NaN, i.e. NaR, counts as one). With
    ``masks``, -inf entries (additive attention masks, which the engine keeps as masks,
    not values) are allowed too."""
    t = t.detach()
    r = fmt.round(t).to(t.dtype)
    ok = (r == t) | (t.isnan() & r.isnan())
    if masks:
        ok |= t == -math.inf
    return bool(ok.all())


def softmax_ref(S: Posit, x: torch.Tensor) -> torch.Tensor:
    """aten_ops._softmax_rows + division, written out: exp(x - max) in float64, rounded;
    one quire sum per row; -inf entries are exact zeros."""
    mask = x == -math.inf
    m = x.amax(-1, keepdim=True)
    z = S.sub(torch.where(mask, m, x), m)
    e = S.round(torch.exp(z.double())).masked_fill(mask, 0.0)
    return S.div(e, quire.sum(e, -1, S, keepdim=True))


def layer_norm_ref(S: Posit, x2: torch.Tensor, w: torch.Tensor, b: torch.Tensor, eps: float):
    """aten_ops._layer_norm written out on rows (R, M): y, mean, rstd."""
    m = float(x2.shape[1])
    mean = S.div(quire.sum(x2, 1, S, keepdim=True), m)
    d = S.sub(x2, mean)
    var = S.div(quire.matmul(d.unsqueeze(1), d.unsqueeze(2), S).reshape(-1, 1), m)
    rstd = S.round(torch.rsqrt(S.add(var, scalar(S, eps)).double()))
    xhat = S.mul(d, rstd)
    return S.fma(S.round(w), xhat, S.round(b)), mean, rstd


# =========================================================================== 1. bit-exact
class Residual(nn.Module):
    def __init__(self, n):
        super().__init__()
        self.lin = nn.Linear(n, n)

    def forward(self, x):
        return x + self.lin(x)


def test_residual_block_bit_exact():
    """y = x + lin(x): lin is a positnn Linear, the add an engine op in F. In backward the
    add passes gy through to both operands; the two contributions to x.grad (gy itself and
    lin's B error) are summed by autograd at the fan-out (the carrier float32 add)."""
    m = convert(Residual(5), MIXED)
    assert isinstance(m.lin, pnn.Linear)
    x = torch.randn(3, 5, requires_grad=True)
    y = m(x)
    W, b = m.lin.weight.detach(), m.lin.bias.detach()
    x_f = F.round(x.detach())
    h = quire.linear(x_f, F.round(W), F.round(b), F)
    assert torch.equal(y, F.add(x_f, h))
    gy = O.round(torch.randn(3, 5))
    y.backward(gy)
    gx_lin = quire.matmul(B.round(gy), B.round(W), B)
    assert torch.equal(x.grad, gy.float() + gx_lin.float())
    assert torch.equal(m.lin.weight.grad, O.round(quire.matmul(G.round(gy).T, G.round(x_f), G)))
    assert torch.equal(m.lin.bias.grad, O.round(quire.sum(G.round(gy), 0, G)))


def _layer_norm_case(x: torch.Tensor):
    ln = nn.LayerNorm(6)
    with torch.no_grad():
        ln.weight.copy_(1 + 0.3 * torch.randn(6))
        ln.bias.copy_(0.2 * torch.randn(6))
    m = convert(ln, MIXED)
    assert type(m) is nn.LayerNorm and torch.equal(m.weight, O.round(ln.weight.detach()))
    x = x.clone().requires_grad_()
    y = m(x)
    gy = O.round(torch.randn(*y.shape))
    y.backward(gy)
    return m, x, y, gy


def _layer_norm_reference(m, x_f, gy):
    """Forward in F; input error in B, weight and bias gradients in G, each re-deriving
    xhat from the op's input and the saved (F) mean and rstd in its own stage."""
    w, b = m.weight.detach(), m.bias.detach()
    y, mean, rstd = layer_norm_ref(F, x_f, w, b, m.eps)

    def xhat_in(S):
        return S.mul(S.sub(S.round(x_f), S.round(mean)), S.round(rstd))

    g_b, xh_b = B.round(gy), xhat_in(B)
    gxh = B.mul(g_b, B.round(w))
    a = B.div(quire.sum(gxh, 1, B, keepdim=True), 6.0)
    c = B.div(quire.matmul(gxh.unsqueeze(1), xh_b.unsqueeze(2), B).reshape(-1, 1), 6.0)
    gx = B.mul(B.fma(-xh_b, c, B.sub(gxh, a)), B.round(rstd))
    g_g, xh_g = G.round(gy), xhat_in(G)
    gw = O.round(quire.matmul(g_g.t().unsqueeze(1), xh_g.t().unsqueeze(2), G).reshape(6))
    gb = O.round(quire.sum(g_g, 0, G))
    return y, gx, gw, gb


def test_layer_norm_bit_exact():
    m, x, y, gy = _layer_norm_case(F.round(torch.randn(4, 6)))  # an F input, as inside a network
    y_ref, gx, gw, gb = _layer_norm_reference(m, x.detach(), gy)
    assert torch.equal(y, y_ref)
    assert torch.equal(x.grad.to(B.dtype), gx)
    assert torch.equal(m.weight.grad, gw)
    assert torch.equal(m.bias.grad, gb)


def test_layer_norm_backward_uses_the_F_input_its_forward_used():
    """A model input (or an O-valued embedding lookup) that is not an F value: the forward
    normalises F.round(x), so the backward's xhat must be that of F.round(x) too (as
    positnn's own layers save the F-rounded input), not one re-rounded from the raw x."""
    x = torch.randn(4, 6)
    m, xg, y, gy = _layer_norm_case(x)
    y_ref, gx, gw, gb = _layer_norm_reference(m, F.round(x), gy)
    assert torch.equal(y, y_ref)
    assert torch.equal(m.bias.grad, gb)
    assert torch.equal(xg.grad.to(B.dtype), gx)
    assert torch.equal(m.weight.grad, gw)


class FunctionalLinear(nn.Module):
    """F.linear in a custom forward, on parameters no positnn module owns (engine addmm)."""

    def __init__(self):
        super().__init__()
        self.w, self.b = nn.Parameter(torch.randn(3, 5) * 0.5), nn.Parameter(torch.randn(3) * 0.1)

    def forward(self, x):
        return TF.linear(x, self.w, self.b)


@pytest.mark.parametrize("inp", ["F_input", "raw_input"])
def test_engine_linear_bit_exact_and_equal_to_positnn_linear(inp):
    """The engine's addmm (bias in the quire) and its mm backward against the reference,
    and against positnn.nn.Linear holding the same weights: one op, two paths, the same
    forward, input error and parameter gradients, whether or not the input is already an
    F value (a model input is rounded to F by the first op that uses it, and the weight
    gradient is formed from that F input, as positnn's Linear saves it)."""
    m = convert(FunctionalLinear(), MIXED)
    assert m.w.posit_policy.optimizer == O and is_posit(m.w, O) and is_posit(m.b, O)
    lin = pnn.Linear(5, 3, policy=MIXED.for_layer(""))
    with torch.no_grad():
        lin.weight.copy_(m.w)
        lin.bias.copy_(m.b)
    x0 = torch.randn(4, 5)
    x0 = F.round(x0) if inp == "F_input" else x0
    x, x2 = x0.clone().requires_grad_(), x0.clone().requires_grad_()
    y, y2 = m(x), lin(x2)
    W, b = m.w.detach(), m.b.detach()
    x_f = F.round(x0)
    assert torch.equal(y, quire.linear(x_f, F.round(W), F.round(b), F)) and torch.equal(y, y2)
    gy = O.round(torch.randn(4, 3))
    y.backward(gy)
    y2.backward(gy)
    assert torch.equal(x.grad.to(B.dtype), quire.matmul(B.round(gy), B.round(W), B))
    assert torch.equal(m.b.grad, O.round(quire.sum(G.round(gy), 0, G)))
    assert torch.equal(m.b.grad, lin.bias.grad)
    assert torch.equal(lin.weight.grad, O.round(quire.matmul(G.round(gy).T, G.round(x_f), G)))
    assert torch.equal(m.w.grad, lin.weight.grad)


class Head(nn.Module):
    """One causal attention head over given q, k, v."""

    def __init__(self, sdpa: bool):
        super().__init__()
        self.sdpa = sdpa

    def forward(self, q, k, v):
        T, d = q.shape[-2:]
        if self.sdpa:
            return TF.scaled_dot_product_attention(q, k, v, is_causal=True)
        a = q @ k.transpose(-2, -1) * (1 / math.sqrt(d))
        a = a.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
        return a.softmax(-1) @ v


@pytest.mark.parametrize("sdpa", [False, True], ids=["masked_fill", "sdpa"])
def test_attention_head_bit_exact(sdpa):
    """scores = q k^T * scale (SDPA's math path scales q and k by sqrt(scale) each), causal
    -inf mask, softmax, @ v; backward through mm, softmax (_softmax_backward_data:
    y * (g - sum(g * y)), the sum in one quire), the mask and the scale, all in B."""
    T, d = 5, 4
    m = convert(Head(sdpa), MIXED)
    q, k, v = (F.round(torch.randn(1, T, d)).requires_grad_() for _ in range(3))
    y = m(q, k, v)
    mask = torch.ones(T, T, dtype=torch.bool).triu(1)
    qd, kd, vd = q.detach(), k.detach(), v.detach()
    if sdpa:
        sf = scalar(F, math.sqrt(1 / math.sqrt(d)))
        qs, ks = F.mul(qd, sf), F.mul(kd, sf)
        s = quire.matmul(qs, ks.transpose(-2, -1), F)
    else:
        s = F.mul(quire.matmul(qd, kd.transpose(-2, -1), F), scalar(F, 1 / math.sqrt(d)))
    p = softmax_ref(F, s.masked_fill(mask, -math.inf))
    assert torch.equal(y, quire.matmul(p, vd, F))
    assert bool((p[0][mask] == 0).all())
    gy = O.round(torch.randn(1, T, d))
    y.backward(gy)
    g_b, p_b = B.round(gy), B.round(p)
    gv = quire.matmul(p_b.transpose(-2, -1), g_b, B)
    gp = quire.matmul(g_b, B.round(vd).transpose(-2, -1), B)
    dot = quire.matmul(gp.unsqueeze(-2), p_b.unsqueeze(-1), B).squeeze(-1)
    gs = B.mul(p_b, B.sub(gp, dot)).masked_fill(mask, 0.0)
    if sdpa:
        sf_b = scalar(B, math.sqrt(1 / math.sqrt(d)))
        gq = B.mul(quire.matmul(gs, B.round(ks), B), sf_b)
        gk = B.mul(quire.matmul(gs.transpose(-2, -1), B.round(qs), B), sf_b)
    else:
        gs = B.mul(gs, scalar(B, 1 / math.sqrt(d)))
        gq = quire.matmul(gs, B.round(kd), B)
        gk = quire.matmul(gs.transpose(-2, -1), B.round(qd), B)
    assert torch.equal(v.grad.to(B.dtype), gv)
    assert torch.equal(q.grad.to(B.dtype), gq)
    assert torch.equal(k.grad.to(B.dtype), gk)


class GeluMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x):
        return self.fc2(TF.gelu(self.fc1(x)))


def test_gelu_mlp_bit_exact():
    m = convert(GeluMLP(), MIXED)
    x = torch.randn(5, 4, requires_grad=True)
    y = m(x)
    W1, b1, W2, b2 = (p.detach() for p in (m.fc1.weight, m.fc1.bias, m.fc2.weight, m.fc2.bias))
    x_f = F.round(x.detach())
    h = quire.linear(x_f, F.round(W1), F.round(b1), F)
    a = F.round(TF.gelu(h.double()))
    assert torch.equal(y, quire.linear(a, F.round(W2), F.round(b2), F))
    gy = O.round(torch.randn(5, 3))
    y.backward(gy)
    ga = quire.matmul(B.round(gy), B.round(W2), B)
    gh = B.round(aten.gelu_backward(B.round(ga).double(), B.round(h).double()))
    assert torch.equal(x.grad.to(B.dtype), quire.matmul(gh, B.round(W1), B))
    assert torch.equal(m.fc2.weight.grad, O.round(quire.matmul(G.round(gy).T, G.round(a), G)))
    assert torch.equal(m.fc2.bias.grad, O.round(quire.sum(G.round(gy), 0, G)))
    assert torch.equal(m.fc1.weight.grad, O.round(quire.matmul(G.round(gh).T, G.round(x_f), G)))
    assert torch.equal(m.fc1.bias.grad, O.round(quire.sum(G.round(gh), 0, G)))


class TiedHead(nn.Module):
    def __init__(self, vocab=7, d=4):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, idx):
        return self.head(self.emb(idx))


def test_tied_embedding_head_bit_exact():
    """The lookup is exact (O masters); the head's weight gradient (G quire) and the
    embedding's (a one-hot G quire matmul of the head's B error) are summed in O."""
    m = convert(TiedHead(), MIXED)
    assert m.head.weight is m.emb.weight and isinstance(m.head, pnn.Linear)
    idx = torch.tensor([[1, 3, 3], [0, 1, 6]])
    y = m(idx)
    W = m.emb.weight.detach()
    e_f = F.round(W[idx])
    assert torch.equal(y, quire.linear(e_f, F.round(W), None, F))
    gy = O.round(torch.randn(2, 3, 7))
    y.backward(gy)
    g2 = gy.reshape(-1, 7)
    g_head = quire.matmul(G.round(g2).T, G.round(e_f.reshape(-1, 4)), G)
    ge = quire.matmul(B.round(g2), B.round(W), B)
    onehot = torch.zeros(7, 6, dtype=F64)
    onehot[idx.reshape(-1), torch.arange(6)] = 1
    g_emb = quire.matmul(onehot, G.round(ge), G)
    assert torch.equal(m.emb.weight.grad, O.add(O.round(g_head), g_emb))


# =========================================================================== GPT, ResNet
class CausalSelfAttention(nn.Module):
    def __init__(self, d, n_head, sdpa=True, p=0.1):
        super().__init__()
        self.c_attn, self.c_proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.attn_dropout, self.resid_dropout = nn.Dropout(p), nn.Dropout(p)
        self.n_head, self.sdpa, self.p = n_head, sdpa, p

    def forward(self, x):
        Bn, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(Bn, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if self.sdpa:
            y = TF.scaled_dot_product_attention(q, k, v, dropout_p=self.p if self.training else 0.0, is_causal=True)
        else:
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
            att = att.masked_fill(torch.tril(torch.ones(T, T)).view(1, 1, T, T) == 0, float("-inf"))
            y = self.attn_dropout(TF.softmax(att, dim=-1)) @ v
        y = y.transpose(1, 2).contiguous().view(Bn, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, d, p=0.1):
        super().__init__()
        self.c_fc, self.c_proj, self.dropout = nn.Linear(d, 4 * d), nn.Linear(4 * d, d), nn.Dropout(p)

    def forward(self, x):
        return self.dropout(self.c_proj(TF.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, d, n_head, sdpa=True):
        super().__init__()
        self.ln_1, self.attn = nn.LayerNorm(d), CausalSelfAttention(d, n_head, sdpa)
        self.ln_2, self.mlp = nn.LayerNorm(d), MLP(d)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """nanoGPT's shape: token + position embeddings, blocks, final LayerNorm, tied head."""

    def __init__(self, vocab=11, block=6, d=8, n_head=2, n_layer=1, sdpa=True):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(block, d)
        self.drop = nn.Dropout(0.1)
        self.h = nn.ModuleList([Block(d, n_head, sdpa) for _ in range(n_layer)])
        self.ln_f = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, idx):
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))
        for blk in self.h:
            x = blk(x)
        return self.lm_head(self.ln_f(x))


def conv3x3(i, o, stride=1):
    return nn.Conv2d(i, o, 3, stride, 1, bias=False)


def conv1x1(i, o, stride=1):
    return nn.Conv2d(i, o, 1, stride, bias=False)


class BasicBlock(nn.Module):
    """torchvision's BasicBlock: inplace ReLU, ``out += identity``."""

    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1, self.bn1 = conv3x3(inplanes, planes, stride), nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2, self.bn2 = conv3x3(planes, planes), nn.BatchNorm2d(planes)
        self.downsample, self.stride = downsample, stride

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class ResNet(nn.Module):
    """torchvision's resnet18 architecture ([2, 2, 2, 2] BasicBlocks), small widths."""

    def __init__(self, layers=(2, 2, 2, 2), widths=(4, 8, 8, 16), num_classes=5):
        super().__init__()
        self.inplanes = widths[0]
        self.conv1 = nn.Conv2d(3, self.inplanes, 7, 2, 3, bias=False)
        self.bn1, self.relu = nn.BatchNorm2d(self.inplanes), nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = self._make_layer(widths[0], layers[0])
        self.layer2 = self._make_layer(widths[1], layers[1], 2)
        self.layer3 = self._make_layer(widths[2], layers[2], 2)
        self.layer4 = self._make_layer(widths[3], layers[3], 2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(widths[3], num_classes)

    def _make_layer(self, planes, blocks, stride=1):
        downsample = None
        if stride != 1 or self.inplanes != planes:
            downsample = nn.Sequential(conv1x1(self.inplanes, planes, stride), nn.BatchNorm2d(planes))
        layers = [BasicBlock(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes
        layers += [BasicBlock(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


# =========================================================================== 2. float32 == torch
def _grads(model):
    return {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("side", [64, 32], ids=["64px", "32px-layer4-at-1x1"])
def test_float32_policy_resnet18_equals_torch(side):
    """Under an all-float32 policy every layer stays torch's own and nothing runs in the
    engine, so outputs, gradients and BatchNorm statistics are torch's bit for bit. At
    32 px (CIFAR size) layer4 runs at 1x1."""
    ref = ResNet()
    pm = convert(ref, "float32")
    assert not any(isinstance(m, pnn.PositModule) for m in pm.modules()) and not hasattr(pm, "posit_engine")
    x = torch.randn(2, 3, side, side)
    t = torch.tensor([1, 3])
    y_ref, y = ref(x), pm(x)
    assert torch.equal(y, y_ref)
    TF.cross_entropy(y_ref, t).backward()
    TF.cross_entropy(y, t).backward()
    g_ref, g = _grads(ref), _grads(pm)
    assert g.keys() == g_ref.keys()
    for n in g:
        assert torch.equal(g[n], g_ref[n]), n
    for (n, a), (_, b) in zip(ref.named_buffers(), pm.named_buffers()):
        assert torch.equal(a, b), n


@pytest.mark.parametrize("sdpa", [True, False], ids=["sdpa", "masked_fill"])
def test_float32_policy_gpt_block_equals_torch_exactly(sdpa):
    """Every module stays torch's own under an all-float32 policy: bit for bit."""
    ref = GPT(sdpa=sdpa).eval()
    pm = convert(ref, "float32")
    assert not any(isinstance(m, pnn.PositModule) for m in pm.modules()) and pm.lm_head.weight is pm.wte.weight
    idx = torch.randint(0, 11, (2, 6))
    t = torch.randint(0, 11, (2, 6))
    y_ref, y = ref(idx), pm(idx)
    assert torch.equal(y, y_ref)
    TF.cross_entropy(y_ref.reshape(-1, 11), t.reshape(-1)).backward()
    TF.cross_entropy(y.reshape(-1, 11), t.reshape(-1)).backward()
    g_ref, g = _grads(ref), _grads(pm)
    assert g.keys() == g_ref.keys()
    for n in g:
        assert torch.equal(g[n], g_ref[n]), n


@pytest.mark.parametrize("policy", ["float32", "posit8-O16-L16q"])
def test_convert_keeps_eval_mode(policy):
    """convert(model.eval()) must give a model in eval mode: every module, swapped or not,
    keeps its ``training`` flag (else dropout stays on and BatchNorm uses batch statistics
    in a model the user put in eval mode)."""
    ref = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5), nn.BatchNorm1d(4), nn.LayerNorm(4)).eval()
    pm = convert(ref, policy)
    assert {name: m.training for name, m in pm.named_modules()} == {name: False for name, _ in ref.named_modules()}
    x = torch.randn(8, 4)
    assert torch.equal(pm(x), pm(x))  # no dropout draws


class LNAttnMLP(nn.Module):
    """Float input: LayerNorm, one causal attention head via Linear layers, GELU MLP."""

    def __init__(self, d=4):
        super().__init__()
        self.ln = nn.LayerNorm(d)
        self.qkv, self.fc, self.out = nn.Linear(d, 3 * d), nn.Linear(d, 2 * d), nn.Linear(2 * d, 3)

    def forward(self, x):
        h = self.ln(x)
        q, k, v = self.qkv(h).chunk(3, -1)
        h = h + TF.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(TF.gelu(self.fc(h)))


def test_float64_gradcheck_under_a_float_policy():
    policy = Policy(forward=None, backward=None, gradient=None, optimizer=None, loss=None)
    assert policy.for_layer("").is_float
    model = convert(LNAttnMLP().double(), policy)
    assert model.fc.weight.dtype == F64
    x = torch.randn(2, 3, 4, dtype=F64, requires_grad=True)
    params = [model.ln.weight, model.qkv.weight, model.fc.bias]
    assert torch.autograd.gradcheck(lambda x, *ps: model(x), (x, *params), atol=1e-6, rtol=1e-4)


# =========================================================================== 3. every intermediate a posit
@pytest.fixture
def staged_outputs(monkeypatch):
    """Records the outputs of every engine op (_StagedOp.forward): (function, path, tensors)."""
    seen = []
    original = engine_mode._StagedOp.forward

    def forward(ctx, call, *tensors):
        out = original(ctx, call, *tensors)
        seen.append((getattr(call.func, "__name__", str(call.func)), call.path, out))
        return out

    monkeypatch.setattr(engine_mode._StagedOp, "forward", staticmethod(forward))
    return seen


def _module_outputs(model):
    seen = []
    for path, mod in model.named_modules():
        mod.register_forward_hook(lambda m, a, o, path=path: seen.append((type(m).__name__, path, o)))
    return seen


def _floating(o):
    if isinstance(o, torch.Tensor):
        return [o] if o.dtype.is_floating_point else []
    if isinstance(o, (tuple, list)):
        return [t for x in o for t in _floating(x)]
    return []


class ResBlockNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.block = BasicBlock(4, 8, 2, nn.Sequential(conv1x1(4, 8, 2), nn.BatchNorm2d(8)))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.block(self.stem(x))), 1))


@pytest.mark.parametrize("which", ["gpt-sdpa", "gpt-masked_fill", "resnet"])
def test_every_intermediate_is_a_posit8(which, staged_outputs):
    """What is checked: the floating outputs of every module (forward hooks) and of every
    engine op (each torch call outside positnn modules: adds, matmuls, softmax, masked_fill,
    GELU, LayerNorm, SDPA, views, pooling ...), and the final logits, are posit(8,2) values.
    The exception is an embedding lookup, which returns its O masters verbatim (it moves,
    not computes, numbers); those outputs are checked to be posit(16,2) values instead."""
    if which == "resnet":
        model, inp = convert(ResBlockNet(), "posit8-O16-L16q"), torch.randn(2, 3, 6, 6)
    else:
        model, inp = convert(GPT(sdpa=which == "gpt-sdpa"), "posit8-O16-L16q"), torch.randint(0, 11, (2, 6))
    modules = _module_outputs(model)
    y = model(inp)
    assert is_posit(y, P8)
    n_checked = 0
    for kind, path, out in modules + staged_outputs:
        for t in _floating(out):
            n_checked += 1
            fmt = P16 if kind in ("Embedding", "embedding") else P8
            assert is_posit(t, fmt, masks=which == "gpt-masked_fill"), (kind, path)
    # Enough was seen: every module, plus the engine ops (for the GPT: embeddings, adds,
    # layer norms, split, views, attention, GELU, ...; for the ResNet: the residual add
    # and the adaptive pool).
    computing = {p for p, m in model.named_modules() if isinstance(m, (nn.LayerNorm, nn.Embedding, pnn.Linear,
                                                                       pnn.Conv2d, pnn.BatchNorm2d))}
    assert computing <= {path for _, path, _ in modules}
    names = {name for name, _, _ in staged_outputs}
    assert names >= ({"add", "adaptive_avg_pool2d"} if which == "resnet" else
                     {"embedding", "add", "layer_norm", "gelu"})
    assert len(staged_outputs) >= (2 if which == "resnet" else 8), names
    assert n_checked >= len(modules) + len(staged_outputs)


# =========================================================================== 4. training
class TinyLM(nn.Module):
    """Embedding -> LayerNorm -> GELU MLP -> LayerNorm -> tied head: predict a class from a
    bag of two tokens."""

    def __init__(self, vocab=8, d=8):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.mix = nn.Linear(d, d)
        self.ln = nn.LayerNorm(d)
        self.fc = nn.Linear(d, d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, idx):
        h = self.mix(self.emb(idx).mean(1))
        h = h + TF.gelu(self.fc(self.ln(h)))
        return self.head(h)


POLICY_TRAIN = "posit8-O16-L16q"


def _task(n=32, vocab=8, generator_seed=0):
    """Two tokens per sample; the label is the first token modulo 4 (separable)."""
    g = torch.Generator().manual_seed(generator_seed)
    idx = torch.randint(0, vocab, (n, 2), generator=g)
    return idx, idx[:, 0] % 4


def _custom_loss(logits, t):
    return -(logits.log_softmax(-1).gather(1, t[:, None])).mean()


def _train(loss_kind, steps=15, seed=0, lr=0.1):
    torch.manual_seed(seed)
    model = convert(TinyLM(), POLICY_TRAIN)
    idx, t = _task()
    opt = poptim.SGD(model.parameters(), lr=lr, momentum=0.9)
    pos_loss = pnn.CrossEntropyLoss(POLICY_TRAIN)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        logits = model(idx)
        if loss_kind == "torch":
            loss = TF.cross_entropy(logits, t)
        elif loss_kind == "custom":
            loss = _custom_loss(logits, t)
        else:
            loss = pos_loss(logits, t)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    with torch.no_grad():
        final = float(TF.cross_entropy(model(idx).float(), t))
    return model, losses, final


def test_training_keeps_tied_weights_one_O_parameter():
    model, losses, final = _train("positnn", steps=4)
    assert model.head.weight is model.emb.weight
    assert len(list(model.parameters())) == len({id(p) for p in model.parameters()})
    for n, p in model.named_parameters():
        assert is_posit(p, P16), n
        assert p.grad is not None and is_posit(p.grad, P16), n
    assert all(math.isfinite(v) for v in losses)


def test_torch_custom_and_positnn_losses_all_learn():
    """The loss written three ways trains the same tiny task in posit8-O16-L16q (SGD,
    lr 0.1, momentum 0.9, 15 full-batch steps): the final loss (cross entropy of the
    trained model's posit logits) must be below 35% of the initial one for each, and
    within a factor 2 of what positnn.nn.CrossEntropyLoss reaches."""
    results = {kind: _train(kind) for kind in ("positnn", "torch", "custom")}
    start = results["positnn"][1][0]
    finals = {kind: r[2] for kind, r in results.items()}
    for kind, final in finals.items():
        assert final < 0.35 * start, (kind, finals, start)
    for kind in ("torch", "custom"):
        assert finals[kind] < 2 * finals["positnn"], finals
        assert finals["positnn"] < 2 * finals[kind], finals
        assert results[kind][0].head.weight is results[kind][0].emb.weight


@pytest.mark.parametrize("loss_kind", ["torch", "positnn"])
def test_gradient_accumulation_matches_one_big_batch(loss_kind):
    """4 micro-batches of 8, each loss divided by 4, against one batch of 32. The roundings
    differ (each micro-batch's gradient is rounded to G and summed in O one rounding per
    micro-batch, the big batch rounds once; F/B/G are posit(12,2) here), so the gradients
    are compared by relative error of each parameter's gradient vector: < 2% (observed
    about 0.4%; a missing or doubled 1/4 would be 75% or 300%)."""
    policy = Policy.parse("posit(12,2)-O16-L16q")
    torch.manual_seed(1)
    model = convert(TinyLM(), policy)
    idx, t = _task(32)
    loss_fn = (lambda y, t: TF.cross_entropy(y, t)) if loss_kind == "torch" else pnn.CrossEntropyLoss(policy)
    loss_fn(model(idx), t).backward()
    big = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    rels = {}
    for i in range(4):
        sl = slice(8 * i, 8 * i + 8)
        (loss_fn(model(idx[sl]), t[sl]) / 4).backward()
    for n, p in model.named_parameters():
        assert is_posit(p.grad, P16), n
        rel = float((p.grad.double() - big[n].double()).norm() / big[n].double().norm())
        rels[n] = rel
    assert max(rels.values()) < 0.02, rels


# =========================================================================== 5. refusal
class Spectral(nn.Module):
    def forward(self, x):
        return torch.fft.rfft(x).real


class Outer(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.blk = nn.Sequential(nn.Identity(), Spectral())

    def forward(self, x):
        return self.blk(self.fc(x))


def test_unsupported_op_raises_naming_op_and_module():
    model = convert(Outer(), "posit8q")
    with pytest.raises(UnsupportedOpError, match=r"aten\._fft_r2c.*'blk\.1'"):
        model(torch.randn(2, 4))
    with pytest.raises(UnsupportedOpError, match=r"aten\._fft_r2c.*'blk\.1'"):
        with torch.no_grad():
            model(torch.randn(2, 4))
    # The failed forward left no engine state behind: an ordinary model still runs.
    assert not model.posit_engine.paths
    y = convert(nn.Sequential(nn.Linear(4, 3), nn.GELU()), "posit8q")(torch.randn(2, 4))
    assert is_posit(y, P8)


def test_policy_can_let_unsupported_ops_run_in_float_and_counts_them():
    from positnn import stats

    policy = Policy.from_dict({"recipe": "posit8q", "unsupported_ops": "float"})
    model = convert(Outer(), policy)
    model(torch.randn(2, 4)).sum().backward()
    counts = stats.float_ops(model)
    assert counts and all(n >= 1 for n in counts.values()) and any("fft" in op for op in counts)
    stats.reset(model)
    assert stats.float_ops(model) == {}
    with pytest.raises(ValueError, match="unsupported_ops"):
        Policy(unsupported_ops="ignore")


# =========================================================================== 6. coverage
def test_resnet_block_trains_two_steps_in_posits():
    model = convert(ResBlockNet(), "posit8-O16-L16q")
    assert isinstance(model.block.bn1, pnn.BatchNorm2d) and type(model.pool) is nn.AdaptiveAvgPool2d
    opt = poptim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    loss_fn = pnn.CrossEntropyLoss("posit8-O16-L16q")
    x, t = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 1])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for _ in range(2):
        opt.zero_grad()
        y = model(x)
        assert is_posit(y, P8) and torch.isfinite(y).all()
        loss = loss_fn(y, t)
        loss.backward()
        for n, p in model.named_parameters():
            assert is_posit(p.grad, P16), n
        opt.step()
    for n, p in model.named_parameters():
        assert is_posit(p, P16), n
    assert any(not torch.equal(p.detach(), before[n]) for n, p in model.named_parameters())
    for n, b in model.named_buffers():
        if b.dtype.is_floating_point:
            assert is_posit(b, P16), n


class MHA(nn.Module):
    def __init__(self):
        super().__init__()
        self.mha = nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, x):
        return self.mha(x, x, x, need_weights=False)[0]


COVERAGE = {
    "conv1d": (lambda: nn.Sequential(nn.Conv1d(3, 4, 3, padding=1), nn.Flatten(), nn.Linear(20, 2)), (2, 3, 5)),
    "groupnorm": (lambda: nn.Sequential(nn.Conv2d(4, 4, 1), nn.GroupNorm(2, 4)), (2, 4, 3, 3)),
    "silu": (lambda: nn.Sequential(nn.Linear(5, 6), nn.SiLU(), nn.Linear(6, 2)), (3, 5)),
    "softmax": (lambda: nn.Sequential(nn.Linear(5, 4), nn.Softmax(dim=-1)), (3, 5)),
    "multihead_attention": (MHA, (2, 4, 8)),
}


@pytest.mark.parametrize("name", list(COVERAGE))
def test_layers_run_forward_and_backward_in_posits(name):
    build, shape = COVERAGE[name]
    model = convert(build(), "posit8-O16-L16q")
    x = torch.randn(*shape, requires_grad=True)
    y = model(x)
    assert is_posit(y, P8) and torch.isfinite(y).all()
    y.backward(P16.round(torch.randn(*y.shape)))
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert is_posit(x.grad, P8)  # the input error of the first op, in B = posit(8,2)
    for n, p in model.named_parameters():
        assert is_posit(p, P16), n
        assert p.grad is not None and is_posit(p.grad, P16) and torch.isfinite(p.grad).all(), n
    assert any(bool(p.grad.any()) for p in model.parameters())


class _InPlace(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        keep = ~(x > 0)  # a bool op on a tensor without grad: run as it is
        y = self.lin(x)
        y += 1.0
        y.mul_(3.0)
        return y.masked_fill(keep, 0.0)


def test_in_place_ops_in_a_custom_forward_are_posit_ops_with_gradients():
    model = convert(_InPlace(), "posit8q")
    x = P8.round(torch.randn(5, 4))
    y = model(x)
    y_lin = quire.linear(x, P8.round(model.lin.weight.detach()), P8.round(model.lin.bias.detach()), P8)
    expected = P8.mul(P8.add(y_lin, 1.0), 3.0).masked_fill(~(x > 0), 0.0)
    assert torch.equal(y, expected)
    y.sum().backward()
    assert model.lin.weight.grad is not None and bool(model.lin.weight.grad.any())


class _Offset(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(100, 4)

    def forward(self, idx):
        return self.emb(idx * 3 + 37)  # integer arithmetic on indices: no posit can hold 40 in posit(8,2)


def test_integer_arithmetic_stays_exact_and_masks_of_both_operands_survive_add():
    model = convert(_Offset(), "posit8q")
    idx = torch.tensor([[0, 1, 2, 20]])
    assert torch.equal(model(idx), model.emb.weight.detach()[idx * 3 + 37])
    from positnn.engine.aten_ops import TABLE
    from positnn.stage import PositStage

    a = torch.tensor([[-math.inf, 1.0], [2.0, 3.0]])
    b = torch.tensor([[0.5, -math.inf], [1.0, 1.0]])
    y = TABLE[torch.ops.aten.add](PositStage(P8), torch.ops.aten.add.Tensor, (a, b), {})
    assert torch.equal(y, torch.tensor([[-math.inf, -math.inf], [3.0, 4.0]]))
