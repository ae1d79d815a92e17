"""Sparsity-training and selection methods built on the engine and the trainer's hooks.

* :mod:`pare.methods.ista`: ISTA on BatchNorm scales (Ye et al. 2018), with constant-channel folding
  (:mod:`pare.methods.fold`);
* :mod:`pare.methods.slimming`: Network Slimming (Liu et al. 2017);
* :mod:`pare.methods.dacp`: DACP-style group lasso + angle penalty (reconstructed from the abstract);
* :mod:`pare.methods.maxplus`: max-plus filter selection (Zhang et al. 2019);
* :mod:`pare.methods.soft_prune`: soft filter pruning with FPGM / L1 / L2 masks recomputed every epoch (He et al.);
* :mod:`pare.methods.registry`: names, one-line summaries and evidence levels (``pare criteria`` lists them).
"""

from __future__ import annotations
