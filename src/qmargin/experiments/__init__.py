"""Experiments: evaluation campaigns, paper reproductions, ablations, the demo."""

from qmargin.experiments.campaign import (
    CampaignProgress,
    campaign_csv_path,
    load_campaign,
    run_ber_campaign,
    summarize_accuracies,
)

__all__ = [
    "CampaignProgress",
    "run_ber_campaign",
    "load_campaign",
    "campaign_csv_path",
    "summarize_accuracies",
]
