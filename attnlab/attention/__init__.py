"""Attention mechanisms as pure functions, with one calling convention.

    out = attend(q, k, v, kind="sigmoid", is_causal=True, impl="chunked")

q [B, Lq, H, D]; k [B, Lk, Hkv, D]; v [B, Lk, Hkv, Dv]; out [B, Lq, H, Dv].
See `attend` for the arguments and `KINDS` for the registered mechanisms.
"""

from attnlab.attention import inline as _inline  # registers kind="inline"
from attnlab.attention import linear as _linear  # registers kind="linear"
from attnlab.attention import soft as _soft  # registers kind="soft"
from attnlab.attention import sparse as _sparse  # registers sparsemax, entmax, topk
from attnlab.attention.api import (IMPLS, apply_weights, attend, attend_with_state, check_options,
                                  impl_kinds, init_decode_state, pallas_decodes, recurrent_kinds,
                                  weights)
from attnlab.attention.kinds import KINDS, Mechanism, RowContext, register_kind
from attnlab.sigmoid_bias import default_sigmoid_bias

__all__ = ["IMPLS", "KINDS", "Mechanism", "RowContext", "apply_weights", "attend",
           "attend_with_state", "check_options", "default_sigmoid_bias", "impl_kinds",
           "init_decode_state", "pallas_decodes", "recurrent_kinds", "register_kind", "weights"]
