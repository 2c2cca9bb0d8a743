"""BlockManager invariants under random operation sequences (hypothesis), and its edge cases."""
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from llmops_lab.engine import BlockManager, NoFreeBlocksError, Sequence

BS = 4


class BlockManagerMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.bm = BlockManager(num_blocks=24, block_size=BS)
        self.live: list[Sequence] = []

    @rule(prompt=st.lists(st.integers(0, 3), min_size=1, max_size=14))
    def add(self, prompt):
        s = Sequence(prompt)
        free_before = self.bm.num_free_blocks
        if self.bm.can_allocate(s):
            cached = self.bm.allocate(s)
            assert len(s.block_table) == -(-len(prompt) // BS)
            assert cached % BS == 0 and cached <= len(prompt)
            self.live.append(s)
        else:
            with pytest.raises(NoFreeBlocksError):
                self.bm.allocate(s)
            assert self.bm.num_free_blocks == free_before and s.block_table == []

    @precondition(lambda self: self.live)
    @rule(i=st.integers(0, 100), tok=st.integers(0, 3))
    def append(self, i, tok):
        s = self.live[i % len(self.live)]
        s.append_token(tok)
        if self.bm.can_append(s):
            shared = [self.bm.blocks[b].ref_count for b in s.block_table]
            copy = self.bm.append_slot(s)
            if copy is not None:
                assert shared[-1] > 1 and copy[1] == s.block_table[-1]
        else:
            s.token_ids.pop()
            with pytest.raises(NoFreeBlocksError):
                s.append_token(tok)
                self.bm.append_slot(s)
            s.token_ids.pop()
        assert len(s.block_table) == -(-len(s) // BS)

    @precondition(lambda self: self.live)
    @rule(i=st.integers(0, 100))
    def fork(self, i):
        parent = self.live[i % len(self.live)]
        child = Sequence(parent.token_ids)
        self.bm.fork(parent, child)
        self.live.append(child)

    @precondition(lambda self: self.live)
    @rule(i=st.integers(0, 100))
    def free(self, i):
        s = self.live.pop(i % len(self.live))
        self.bm.free(s)
        with pytest.raises(RuntimeError, match="twice"):
            self.bm.free(s)

    @invariant()
    def consistent(self):
        self.bm.check_invariants(self.live)

    def teardown(self):
        for s in self.live:
            self.bm.free(s)
        self.bm.check_invariants([])
        assert self.bm.num_free_blocks == len(self.bm.blocks), "blocks leaked"


TestBlockManager = BlockManagerMachine.TestCase
TestBlockManager.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)


def test_prefix_cache_reuses_full_blocks_only():
    bm = BlockManager(16, BS)
    a = Sequence(list(range(10)))
    bm.allocate(a)
    b = Sequence(list(range(8)) + [99, 98, 97])
    assert bm.allocate(b) == 8                       # two full blocks shared, the partial one not
    assert b.block_table[:2] == a.block_table[:2] and b.block_table[2] != a.block_table[2]
    bm.free(a)
    bm.free(b)
    c = Sequence(list(range(8)))                     # freed blocks stay cached until reused
    assert bm.allocate(c) == 8
    bm.check_invariants([c])


def test_full_prefix_hit_exactly_at_a_block_boundary():
    bm = BlockManager(8, BS)
    a = Sequence(list(range(8)))
    bm.allocate(a)
    b = Sequence(list(range(8)))
    assert bm.allocate(b) == 8 and b.block_table == a.block_table
    b.append_token(5)                                # opens a fresh block: nothing shared is written
    assert bm.append_slot(b) is None and b.block_table[:2] == a.block_table
    bm.check_invariants([a, b])


def test_copy_on_write_after_fork():
    bm = BlockManager(8, BS)
    p = Sequence([1, 2, 3, 4, 5, 6])                 # second block half full
    bm.allocate(p)
    c = Sequence(p.token_ids)
    bm.fork(p, c)
    c.append_token(7)
    src, dst = bm.append_slot(c)
    assert src == p.block_table[-1] and dst == c.block_table[-1] and src != dst
    p.append_token(8)
    assert bm.append_slot(p) is None                  # p now owns its block alone: no copy
    bm.check_invariants([p, c])
    bm.free(p)                                        # a freed sequence is refused by name (it was a
    for use in (lambda: bm.fork(p, Sequence([1])), lambda: bm.append_slot(p), lambda: bm.allocate(p)):
        with pytest.raises(RuntimeError, match="was freed"):      # bare TypeError or AttributeError)
            use()
    p.block_table = []                                # what the scheduler does when it preempts
    bm.allocate(p)
    bm.check_invariants([p, c])


@pytest.mark.parametrize("bad", [0, 3, 12, -4])
def test_block_size_must_be_a_power_of_two(bad):
    with pytest.raises(ValueError, match="power of two"):
        BlockManager(8, bad)


def test_pool_exhaustion_is_a_signal_not_corruption():
    bm = BlockManager(2, BS)
    s = Sequence(list(range(12)))
    assert not bm.can_allocate(s)
    with pytest.raises(NoFreeBlocksError):
        bm.allocate(s)
    assert bm.num_free_blocks == 2 and s.block_table == []


@pytest.mark.parametrize("num_blocks, block_size, match", [
    (4, 4.0, "block_size must be a power of two >= 1, got 4.0"),
    (4, True, "block_size must be a power of two >= 1, got True"),
    (2.5, 4, "num_blocks must be an integer >= 1, got 2.5"),
    (True, 4, "num_blocks must be an integer >= 1, got True"),
])
def test_sizes_must_be_integers(num_blocks, block_size, match):
    """BlockManager(4, 4.0) failed with "unsupported operand type(s) for &", BlockManager(2.5, 4) with
    a raw TypeError from range(), and BlockManager(4, True) ran with one-token blocks."""
    with pytest.raises(ValueError, match=match):
        BlockManager(num_blocks, block_size)


def test_a_pending_block_is_a_hit_only_for_the_forward_that_computes_it():
    """With track_computed a full block whose KV is not written yet is no prefix-cache hit (the paged
    cache reused unwritten blocks after a failed forward), except for a sequence that the same forward
    computes (``computing``: identical prompts in one batch)."""
    bm = BlockManager(8, BS, track_computed=True)
    a = Sequence(list(range(6)))
    bm.allocate(a)
    b = Sequence(list(range(6)))
    assert bm.allocate(b, computing=set(a.block_table)) == 4 and b.block_table[0] == a.block_table[0]
    bm.free(b)
    c = Sequence(list(range(6)))
    assert bm.allocate(c) == 0 and c.block_table[0] != a.block_table[0]   # not written yet: no hit
    bm.mark_computed(c, 6)
    d = Sequence(list(range(6)))
    assert bm.allocate(d) == 4 and d.block_table[0] == c.block_table[0]
    bm.check_invariants([a, c, d])


def test_block_hash_is_a_sha256_chain():
    from llmops_lab.engine.block_manager import block_hash
    a = block_hash([1, 2, 3, 4], None)
    assert isinstance(a, bytes) and len(a) == 32 and a == block_hash((1, 2, 3, 4), None)
    assert block_hash([5, 6, 7, 8], a) != block_hash([5, 6, 7, 8], block_hash([1, 2, 3, 5], None))
    # a first block whose bytes begin like a digest is not a later block: lengths differ
    assert block_hash([9] * 8, None) != block_hash([9] * 4, a)


def test_freeing_a_table_with_a_freed_block_changes_nothing():
    """A table naming a block already freed and one another sequence holds: free raised only after
    it had handed back the live block (ref 0, on the free list, its KV about to be overwritten)."""
    bm = BlockManager(6, 4)
    a, b = Sequence(list(range(10))), Sequence(list(range(100, 106)))
    bm.allocate(a)
    bm.allocate(b)
    stale = a.block_table[0]
    bm.free(a)
    c = Sequence([7])
    c.block_table = [stale, b.block_table[0]]
    free, refs = list(bm.free_ids), [x.ref_count for x in bm.blocks]
    with pytest.raises(RuntimeError, match=f"block {stale} freed twice.*nothing was freed"):
        bm.free(c)
    assert (list(bm.free_ids), [x.ref_count for x in bm.blocks]) == (free, refs)
    bm.check_invariants([b])
    d = Sequence([1, 2, 3])                      # a block named twice in one table counts twice
    d.block_table = [b.block_table[1], b.block_table[1]]
    with pytest.raises(RuntimeError, match="holds it 2 time"):
        bm.free(d)
    bm.check_invariants([b])
