"""The campaign engine: a campaign is a grid of cells (error model, BER, pattern seed) evaluated on a
model with an evaluation (data + metric) and kept in a resumable store.

* :mod:`~qmargin.engine.grid`: the cells and the seed scheme ``s_r = base_seed + r``;
* :mod:`~qmargin.engine.metrics`: top-1, top-k, cross-entropy, user ``(sum, count)`` callables;
* :mod:`~qmargin.engine.evaluation`: streamed data (any iterable of batches, a DataLoader) + metric;
* :mod:`~qmargin.engine.activations`: quantized activation buffers with bit errors in campaigns;
* :mod:`~qmargin.engine.cells`: one cell evaluated (pure; cells run in any order or place);
* :mod:`~qmargin.engine.executors`: where cells run (this process, or Ray workers; Ray imported
  only by :class:`~qmargin.engine.executors.RayExecutor`);
* :mod:`~qmargin.engine.store`: result files (schema version, validation, settings diff, resume,
  shards, merge);
* :mod:`~qmargin.engine.run`: :func:`run_campaign` and the one-call :func:`stress`.
"""

from qmargin.engine.activations import ActivationSetup
from qmargin.engine.cells import CellOutcome, PassResult, evaluate_cell
from qmargin.engine.evaluation import Evaluation
from qmargin.engine.grid import MAX_REPEATS, Cell, Grid
from qmargin.engine.metrics import Metric, MetricError, list_metrics, register_metric, resolve_metric
from qmargin.engine.run import CampaignProgress, run_campaign, stress
from qmargin.engine.store import CampaignState, campaign_csv_path, load_campaign, validate_campaign

__all__ = [
    "stress",
    "run_campaign",
    "ActivationSetup",
    "Evaluation",
    "Metric",
    "MetricError",
    "register_metric",
    "resolve_metric",
    "list_metrics",
    "Grid",
    "Cell",
    "MAX_REPEATS",
    "CellOutcome",
    "PassResult",
    "evaluate_cell",
    "CampaignProgress",
    "CampaignState",
    "campaign_csv_path",
    "load_campaign",
    "validate_campaign",
]
