"""The ops layer: each op's public function, validation, custom-op registration and backends.

Modules call these functions; kernels plug in as backends (``dispatch.register``).
"""
from .compress import compress
from .rel_pos_attention import rel_pos_attention
from .saccade_gather import saccade_gather
from .varlen_attention import varlen_attention

__all__ = ["compress", "rel_pos_attention", "saccade_gather", "varlen_attention"]
