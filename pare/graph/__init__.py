"""Tracing, channel groups and surgery."""

from pare.graph.graph import ChannelGraph, trace
from pare.graph.groups import Group, Member

__all__ = ["ChannelGraph", "Group", "Member", "trace"]
