"""Channel layouts and the partition of channels into coupled groups.

A *space* is a run of channels created at one place: a producer's output (conv, linear), a model input, a block of
zero channels added by a pad, a per-channel parameter used in an element-wise op, or the output of an operator the
engine does not understand. The channel dimension of every traced tensor is described by a *layout*: the list of
space slices it is made of, in order (``cat`` concatenates layouts, ``split`` slices them, element-wise ops keep
them).

Operators that make channels of two tensors correspond (``a + b``, a BatchNorm used twice, ...) record an
*equality*: slice ``[s, s+n)`` of space A is channel-for-channel the same as slice ``[t, t+n)`` of space B. The
partition cuts every space into *atoms* so that each equality maps whole atoms onto whole atoms, then unites the
atoms; each resulting class is one group, removable only as a whole (channel i of the group is channel i of every
atom in it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import pairwise
from math import gcd

import numpy as np


@dataclass(frozen=True)
class Seg:
    """Channels ``[start, start + length)`` of space ``space``."""

    space: int
    start: int
    length: int


Layout = tuple[Seg, ...]


def layout_size(layout: Layout) -> int:
    return sum(s.length for s in layout)


def slice_layout(layout: Layout, start: int, stop: int) -> Layout:
    """The channels ``[start, stop)`` of a layout, as a layout."""
    out: list[Seg] = []
    pos = 0
    for s in layout:
        lo, hi = max(start, pos), min(stop, pos + s.length)
        if lo < hi:
            out.append(Seg(s.space, s.start + lo - pos, hi - lo))
        pos += s.length
    return tuple(out)


def pieces(a: Layout, b: Layout) -> list[tuple[Seg, Seg]]:
    """Align two equally long layouts position by position, as pairs of equally long segments."""
    out: list[tuple[Seg, Seg]] = []
    ia = ib = 0
    oa = ob = 0
    while ia < len(a) and ib < len(b):
        sa, sb = a[ia], b[ib]
        n = min(sa.length - oa, sb.length - ob)
        out.append((Seg(sa.space, sa.start + oa, n), Seg(sb.space, sb.start + ob, n)))
        oa += n
        ob += n
        if oa == sa.length:
            ia, oa = ia + 1, 0
        if ob == sb.length:
            ib, ob = ib + 1, 0
    return out


@dataclass
class Space:
    """A run of channels created at one node. ``kind``: producer, input, pad, param or opaque."""

    id: int
    size: int
    kind: str
    owner: str  # module path or node name that created it
    order: int  # creation order (topological), for stable group ids


@dataclass
class Atom:
    space: int
    start: int
    length: int


@dataclass
class AtomClass:
    """One group before naming: equally long atoms that must be removed channel-for-channel together."""

    atoms: list[Atom]
    frozen: list[str] = field(default_factory=list)
    block: int = 1  # removals must be whole aligned blocks of this many channels (GroupNorm groups)

    @property
    def size(self) -> int:
        return self.atoms[0].length


class Partition:
    """Collects spaces, equalities, freezes and block constraints; then computes the atom classes."""

    def __init__(self) -> None:
        self.spaces: list[Space] = []
        self.equalities: list[tuple[Seg, Seg]] = []
        self.freezes: list[tuple[Seg, str]] = []
        self.blocks: list[tuple[Seg, int, int]] = []  # (segment, block, its position)
        self.boundaries: list[Seg] = []

    def new_space(self, size: int, kind: str, owner: str) -> int:
        sid = len(self.spaces)
        self.spaces.append(Space(sid, size, kind, owner, sid))
        return sid

    def new_layout(self, size: int, kind: str, owner: str) -> Layout:
        if size <= 0:
            return ()
        return (Seg(self.new_space(size, kind, owner), 0, size),)

    def unify(self, a: Layout, b: Layout) -> None:
        """Record that layouts ``a`` and ``b`` (equally long) are channel-for-channel the same channels."""
        for sa, sb in pieces(a, b):
            if sa != sb:
                self.equalities.append((sa, sb))

    def freeze(self, layout: Layout, reason: str) -> None:
        for s in layout:
            self.freezes.append((s, reason))

    def keep_whole(self, layout: Layout) -> None:
        """Each segment of ``layout`` must be a union of atoms (a parameter that follows it is sliced whole)."""
        self.boundaries.extend(layout)

    def require_blocks(self, layout: Layout, block: int) -> None:
        """Removals from ``layout`` must be whole runs of ``block`` channels aligned to the positions of the
        tensor ``layout`` describes (GroupNorm groups: a segment that starts inside a group is cut at the group
        boundaries, and a piece smaller than a group is frozen)."""
        if block > 1:
            pos = 0
            for s in layout:
                self.blocks.append((s, block, pos))
                pos += s.length

    # -- solving ----------------------------------------------------------------------------------------------

    def _cuts(self) -> list[set[int]]:
        cuts: list[set[int]] = [{0, sp.size} for sp in self.spaces]
        for sa, sb in self.equalities:
            cuts[sa.space].update((sa.start, sa.start + sa.length))
            cuts[sb.space].update((sb.start, sb.start + sb.length))
        for s, _ in self.freezes:
            cuts[s.space].update((s.start, s.start + s.length))
        for s, block, pos in self.blocks:
            cuts[s.space].update((s.start, s.start + s.length))
            # Split off the pieces before the first and after the last block boundary of the tensor: they share
            # a block with channels outside the segment; the aligned middle stays one atom.
            first = s.start + (-pos) % block
            last = s.start + s.length - (pos + s.length) % block
            if first < last:
                cuts[s.space].update((first, last))
        for s in self.boundaries:
            cuts[s.space].update((s.start, s.start + s.length))
        # Propagate cuts through equalities until nothing changes: a cut inside one side of an equality must
        # also cut the other side, or atoms would not map onto atoms.
        by_space: dict[int, list[tuple[Seg, Seg]]] = {}
        for sa, sb in self.equalities:
            by_space.setdefault(sa.space, []).append((sa, sb))
            by_space.setdefault(sb.space, []).append((sb, sa))
        work = list(range(len(self.spaces)))
        queued = set(work)
        while work:
            sid = work.pop()
            queued.discard(sid)
            for src, dst in by_space.get(sid, ()):
                for c in list(cuts[sid]):
                    if src.start < c < src.start + src.length:
                        d = dst.start + (c - src.start)
                        if d not in cuts[dst.space]:
                            cuts[dst.space].add(d)
                            if dst.space not in queued:
                                work.append(dst.space)
                                queued.add(dst.space)
        return cuts

    def solve(self) -> list[AtomClass]:
        """Return the atom classes (the groups, before naming)."""
        cuts = self._cuts()
        atoms: list[Atom] = []
        index: dict[tuple[int, int], int] = {}
        for sp in self.spaces:
            points = sorted(cuts[sp.id])
            for lo, hi in pairwise(points):
                index[(sp.id, lo)] = len(atoms)
                atoms.append(Atom(sp.id, lo, hi - lo))
        parent = list(range(len(atoms)))

        def find(i: int) -> int:
            while parent[i] != i:
                parent[i] = parent[parent[i]]
                i = parent[i]
            return i

        space_points = [sorted(c) for c in cuts]

        def atoms_in(seg: Seg) -> list[int]:
            pts = space_points[seg.space]
            lo = int(np.searchsorted(pts, seg.start))
            out = []
            for p in pts[lo:]:
                if p >= seg.start + seg.length:
                    break
                out.append(index[(seg.space, p)])
            return out

        for sa, sb in self.equalities:
            for i, j in zip(atoms_in(sa), atoms_in(sb)):
                ri, rj = find(i), find(j)
                if ri != rj:
                    parent[ri] = rj
        classes: dict[int, AtomClass] = {}
        for i, atom in enumerate(atoms):
            classes.setdefault(find(i), AtomClass([])).atoms.append(atom)
        result = list(classes.values())
        class_of_atom = {}
        for ci, cls in enumerate(result):
            cls.atoms.sort(key=lambda a: (self.spaces[a.space].order, a.start))
            for a in cls.atoms:
                class_of_atom[(a.space, a.start)] = ci
        for seg, reason in self.freezes:
            for ai in atoms_in(seg):
                cls = result[class_of_atom[(atoms[ai].space, atoms[ai].start)]]
                if reason not in cls.frozen:
                    cls.frozen.append(reason)
        for seg, block, pos in self.blocks:
            for ai in atoms_in(seg):
                a = atoms[ai]
                cls = result[class_of_atom[(a.space, a.start)]]
                if (pos + a.start - seg.start) % block or a.length % block:
                    msg = f"channel groups of {block} (GroupNorm) do not align with coupled channels"
                    if msg not in cls.frozen:
                        cls.frozen.append(msg)
                else:
                    cls.block = cls.block * block // gcd(cls.block, block)
        return result
