"""The vocabulary of a retrain run's record, shared by the flow, the registry and the reports.

A run ends in one :class:`RunStatus`; a gated model version carries one :class:`Decision`;
a registered version records where it came from under the lineage keys below.
"""

from __future__ import annotations


class RunStatus:
    """How a retrain run ended (``outputs/runs/*.json`` ``status``)."""

    PROMOTED = "promoted"  # a new version passed the gate and is the champion
    REJECTED = "rejected by the gate"  # a new version was registered; the champion stayed
    NOTHING_NEW = "nothing new"  # data, params and code unchanged: the version exists
    NO_NEW_DATA = "no new data"  # scheduled run stopped early: the champion's data
    FAILED = "failed"  # a stage or the registry failed: nothing registered
    ROLLED_BACK = "rolled back"  # a person gave the champion alias back to the previous version
    FORCED = "promoted by hand"  # a person promoted a version past the gate, with a reason

    UNTRAINED = (NOTHING_NEW, NO_NEW_DATA)  # runs that trained nothing
    OWN_OUTPUTS = (PROMOTED, REJECTED, NOTHING_NEW)  # the workspace holds this run's model
    WITHOUT_EVALUATION = (NO_NEW_DATA, FAILED, ROLLED_BACK, FORCED)  # no evaluation of this run to show


class Decision:
    """The promotion gate's verdict on a model version (its ``gate.decision`` tag)."""

    PROMOTED = "promoted"
    REJECTED = "rejected"
    FORCED = "forced"  # promoted by a person past the gate (the reason is recorded)


# Where a registered version came from, in the order reports show them.
LINEAGE_KEYS = (
    "data_version",  # DVC hash of the validated dataset
    "raw_data_hash",  # sha256 of the company files read
    "adapter_version",  # DVC hash of the trained run folder (timings included)
    "adapter_digest",  # sha256 of the adapters' weights and configs: the model's content
    "init_version",  # DVC hash of the init stage's adapter
    "git_commit",  # the code (with -dirty when it had uncommitted changes)
    "uncommitted",  # the files the commit did not hold (a run allowed with --allow-uncommitted)
    "params_hash",  # sha256 of every setting
    "base_model",  # the base model folder
)
# What every registered version must record to be rebuildable.
REQUIRED_LINEAGE = ("data_version", "adapter_version", "git_commit", "params_hash", "raw_data_hash")
# Two versions with these equal are the same model (registered once): its content, not the
# run that made it (a run folder's hash holds timings; a new commit may train the same adapter).
IDENTITY_KEYS = ("adapter_digest", "data_version", "params_hash", "base_model")
