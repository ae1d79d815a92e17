"""Groups of coupled channels and their members."""

from __future__ import annotations

from dataclasses import dataclass

from pare.graph.layout import AtomClass, Space
from pare.graph.rules import Use


@dataclass(frozen=True)
class Member:
    """One place a group's channels live: dim ``dim`` of ``module.param``.

    Group channel ``i`` is the slice ``[offset + i*stride, offset + (i+1)*stride)`` of that dim (``stride`` > 1
    for a Linear reading a flattened feature map, where one channel is H*W features).
    ``role``: "out" (a producer's filters), "in" (a consumer's input weights), "norm" (per-channel
    normalisation parameters and statistics), "param" (a per-channel parameter in an element-wise op), "pad"
    (zero channels added by a pad; ``param`` is "pad").
    """

    module: str
    param: str
    dim: int
    offset: int
    stride: int
    role: str


@dataclass(frozen=True)
class Group:
    """A set of channel slices that must be removed together.

    ``id`` names the group after its first producer (module path, with ``[a:b]`` when only part of the
    producer's channels belong to it). ``size`` is the channel count; removals are indices in ``range(size)``,
    in whole aligned runs of ``block`` channels. A group is not ``prunable`` when it holds model inputs or
    outputs, no producer, or channels an operator pare does not understand touches; ``reason`` says which.
    """

    id: str
    size: int
    prunable: bool
    reason: str
    members: tuple[Member, ...]
    block: int = 1

    def producers(self) -> tuple[Member, ...]:
        return tuple(m for m in self.members if m.role == "out")

    def __repr__(self) -> str:
        state = "prunable" if self.prunable else f"frozen: {self.reason}"
        return f"Group({self.id!r}, size={self.size}, {state}, members={len(self.members)})"


UseIndex = dict[int, list[tuple[Use, int, int, int]]]  # space -> (use, seg.start, seg.length, position)


def index_uses(uses: list[Use]) -> UseIndex:
    index: UseIndex = {}
    for use in uses:
        pos = 0
        for seg in use.layout:
            index.setdefault(seg.space, []).append((use, seg.start, seg.length, pos))
            pos += seg.length
    return index


def members_of(cls: AtomClass, index: UseIndex) -> tuple[Member, ...]:
    """The parameter slices of every use whose layout contains one of the class's atoms."""
    out: list[Member] = []
    for atom in cls.atoms:
        for use, start, length, pos in index.get(atom.space, ()):
            if start <= atom.start and atom.start + atom.length <= start + length:
                offset = (pos + atom.start - start) * use.expand
                out.append(Member(use.module, use.param, use.dim, offset, use.expand, use.role))
    return tuple(out)


def group_name(cls: AtomClass, spaces: list[Space], atoms_per_space: dict[int, int]) -> str:
    producer = next((a for a in cls.atoms if spaces[a.space].kind == "producer"), None)
    atom = producer or cls.atoms[0]
    space = spaces[atom.space]
    base = space.owner or "<input>"
    if space.kind not in ("producer",):
        base = f"{space.kind}:{base}"
    if atoms_per_space.get(atom.space, 1) > 1:
        base = f"{base}[{atom.start}:{atom.start + atom.length}]"
    return base
