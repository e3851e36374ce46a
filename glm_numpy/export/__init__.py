"""Hand a checkpoint to other runtimes.

write_gguf(src_dir, dst_path, type="f16")   one GGUF file llama.cpp runs with nothing else
"""

from glm_numpy.export.gguf import GGUF_TYPES, write_gguf

__all__ = ["GGUF_TYPES", "write_gguf"]
