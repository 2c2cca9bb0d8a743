"""The serving engine's bookkeeping: sequences and the paged KV block manager (plain Python)."""
from .block_manager import Block, BlockManager, NoFreeBlocksError
from .sequence import Sequence, SequenceStatus

__all__ = ["Block", "BlockManager", "NoFreeBlocksError", "Sequence", "SequenceStatus"]
