"""The mask rule, multimodal AdaLN and connector maths, pinned on small hand-checked cases."""

import torch
import torch.nn.functional as F

from haplo.model import ops
from haplo.model.config import ConnectorConfig
from haplo.model.layers import Connector


def visible(key_start, query_len=None):
    key_start = torch.tensor([key_start])
    return ops.block_mask(key_start, query_len or key_start.shape[-1])[0, 0]


def test_text_is_causal():
    assert torch.equal(visible([0, 1, 2, 3]), torch.tril(torch.ones(4, 4, dtype=torch.bool)))


def test_image_block_is_bidirectional_inside_causal_outside():
    # text 0-1, image block 2-4, text 5
    mask = visible([0, 1, 2, 2, 2, 5])
    assert mask[2, 4] and mask[3, 4] and mask[4, 2]  # inside the block: both directions
    assert not mask[1, 2] and not mask[0, 3]  # earlier text does not see the image
    assert mask[5, :].all()  # later text sees everything before it
    assert not mask[2, 5]  # the image does not see later text


def test_padding_keys_are_never_visible():
    key_start = ops.causal_key_start(torch.tensor([[0, 0, 1, 1]]))
    mask = ops.block_mask(key_start, 4)[0, 0]
    assert not mask[:, :2].any()
    assert torch.equal(mask[2:, 2:], torch.tril(torch.ones(2, 2, dtype=torch.bool)))


def test_decode_queries_are_the_last_slots():
    # two cached tokens of one block + one new token: the new query (slot 2) sees all three
    assert visible([0, 0, 2], query_len=1).tolist() == [[True, True, True]]


def test_rows_without_visible_keys_are_zero_and_finite():
    q, k, v = torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4)
    key_start = ops.apply_padding(torch.arange(3)[None], torch.tensor([[0, 1, 1]]))
    out = ops.hybrid_attention(q, k, v, key_start)
    assert torch.isfinite(out).all() and out[:, :, 0].abs().max() == 0


def test_hybrid_attention_matches_explicit_softmax_with_gqa():
    q, k, v = torch.randn(2, 4, 5, 8), torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8)
    key_start = torch.tensor([[0, 1, 1, 1, 4], [0, 1, 2, 3, 4]])
    out = ops.hybrid_attention(q, k, v, key_start)
    mask = ops.block_mask(key_start, 5)
    k2, v2 = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    scores = (q @ k2.transpose(-1, -2)) / 8**0.5
    expected = scores.masked_fill(~mask, float("-inf")).softmax(-1) @ v2
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def adaln_inputs(h=6):
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    return r(2, 3, h), r(h), r(h), r(2, h), r(2), r(3, h), r(3, h)


def test_adaln_rmsnorm_by_hand():
    x, w, b, iw, ib, ssg_l, ssg_c = adaln_inputs()
    out, gate = ops.multimodal_adaln(x, w, None, iw, ib, ssg_l, ssg_c, 1e-6, "rmsnorm")
    unit = x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-6)
    m = torch.softmax(F.silu(unit) @ iw.T + ib, -1)  # switch reads the un-weighted normalised input
    mix = lambda row: m[..., :1] * ssg_l[row] + m[..., 1:] * ssg_c[row]  # noqa: E731
    torch.testing.assert_close(out, unit * w * (1 + mix(1)) + mix(0))
    torch.testing.assert_close(gate, mix(2))


def test_adaln_layernorm_switch_reads_raw_input():
    x, w, b, iw, ib, ssg_l, ssg_c = adaln_inputs()
    out, gate = ops.multimodal_adaln(x, w, b, iw, ib, ssg_l, ssg_c, 1e-5, "layernorm")
    m = torch.softmax(F.silu(x) @ iw.T + ib, -1)
    mix = lambda row: m[..., :1] * ssg_l[row] + m[..., 1:] * ssg_c[row]  # noqa: E731
    torch.testing.assert_close(out, F.layer_norm(x, (6,), w, b, 1e-5) * (1 + mix(1)) + mix(0))
    torch.testing.assert_close(gate, mix(2))


def test_adaln_switch_selects_a_state_set():
    x, w, b, iw, ib, ssg_l, ssg_c = adaln_inputs()
    _, gate = ops.multimodal_adaln(
        x, w, None, torch.zeros_like(iw), torch.tensor([50.0, -50.0]), ssg_l, ssg_c, 1e-6, "rmsnorm"
    )
    torch.testing.assert_close(gate, ssg_l[2].expand_as(gate))  # index 0 -> the latent set


def test_connector_without_pre_norm():
    torch.manual_seed(0)
    conn = Connector(4, 6, ConnectorConfig(use_pre_norm=False, use_affine_bias=False))
    x = torch.randn(2, 3, 4)
    r = x @ conn.affine.weight.T
    t = conn.transform[2](F.silu(F.layer_norm(r, (6,), conn.transform[0].weight, conn.transform[0].bias)))
    m = torch.softmax(conn.connector_indicator[1](F.silu(r)), -1)  # switch reads the projection
    torch.testing.assert_close(conn(x), t * m[..., :1] + r * m[..., 1:])
    assert conn.affine.bias is None


def test_connector_with_pre_norm_switch_reads_transform():
    torch.manual_seed(0)
    conn = Connector(4, 6, ConnectorConfig(use_pre_norm=True, use_affine_bias=True))
    with torch.no_grad():
        conn.scale.uniform_(0.5, 1.5)
    x = torch.randn(2, 3, 4)
    r = conn.affine(F.layer_norm(x, (4,), conn.pre_norm.weight, conn.pre_norm.bias)) * conn.scale
    t = conn.transform(r)
    m = torch.softmax(conn.connector_indicator(t), -1)
    torch.testing.assert_close(conn(x), t * m[..., :1] + r * m[..., 1:])
