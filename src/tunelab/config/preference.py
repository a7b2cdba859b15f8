"""Config section for preference training: reward models (``task: reward``) and the DPO family
(``task: dpo``). Defaults live here and only here.

Loss defaults follow the papers: DPO beta 0.1 (Rafailov et al. 2023, arXiv:2305.18290, §6),
IPO tau 0.1 (Azar et al. 2023, arXiv:2310.12036; TRL's default), hinge beta 0.1 (as DPO),
SimPO beta 2.0 and gamma 1.0 (Meng et al. 2024, arXiv:2405.14734, §3: beta in 2.0-2.5,
gamma/beta = 0.5), ORPO lambda 0.1 (Hong et al. 2024, arXiv:2403.07691, §4), KTO beta 0.1 and
desirable/undesirable weights 1.0 (Ethayarajh et al. 2024, arXiv:2402.01306, §4.2; TRL's defaults).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from tunelab.config.base import StrictModel

PreferenceLossName = Literal["dpo", "ipo", "hinge", "simpo", "orpo", "kto"]
# beta when the config does not set one: SimPO's beta is a length-normalized reward scale (2.0);
# DPO/IPO/hinge's is an inverse KL strength (0.1). ORPO has no beta (it uses lam).
DEFAULT_BETA: dict[str, float] = {"dpo": 0.1, "ipo": 0.1, "hinge": 0.1, "simpo": 2.0, "orpo": 0.1, "kto": 0.1}
REFERENCE_FREE = ("simpo", "orpo")


class PreferenceConfig(StrictModel):
    """Preference-training settings (``preference:`` section of a config)."""

    loss: PreferenceLossName = Field(
        "dpo",
        description="task=dpo: 'dpo' (sigmoid; label_smoothing>0 = conservative DPO), 'ipo', 'hinge', "
        "'simpo' (reference-free, length-normalized), 'orpo' (reference-free, odds ratio + SFT NLL), 'kto' "
        "(unpaired desirable/undesirable completions, records with label: true/false or pairs split in two; "
        "never packed).",
    )
    beta: float = Field(
        0.1, gt=0,
        description="DPO/IPO/hinge/KTO: inverse KL strength (0.1); SimPO: reward scale (2.0). If unset, the "
        "loss's paper default is filled in. Unused by ORPO.",
    )
    label_smoothing: float = Field(
        0.0, ge=0.0, lt=0.5, description="dpo/simpo: assumed label-flip probability (conservative DPO)."
    )
    gamma: float = Field(1.0, ge=0.0, description="simpo: target reward margin (reward units).")
    lam: float = Field(0.1, ge=0.0, description="orpo: weight of the odds-ratio term next to the SFT NLL.")
    desirable_weight: float = Field(
        1.0, gt=0, description="kto: weight lambda_D of desirable examples' loss (the paper advises "
        "lambda_D n_D / (lambda_U n_U) in [1, 4/3] when the classes are imbalanced).",
    )
    undesirable_weight: float = Field(1.0, gt=0, description="kto: weight lambda_U of undesirable examples' loss.")
    reference: Literal["auto", "adapters_off", "frozen_copy", "precomputed"] = Field(
        "auto",
        description="Reference model for dpo/ipo/hinge: 'adapters_off' (LoRA: the policy with adapters "
        "disabled, no second copy), 'frozen_copy' (a frozen deep copy), 'precomputed' (reference log-probs "
        "computed once before training and cached on disk; not for kto, whose mismatched pairs change with the "
        "batch). 'auto' = adapters_off with LoRA, else precomputed (kto: frozen_copy). "
        "Always run in eval mode (no dropout).",
    )
    reference_cache: str | None = Field(
        None, description="Directory for precomputed reference log-probs (null = <output_dir>/reference_logps)."
    )
    disable_dropout: bool = Field(
        True,
        description="Turn off every dropout in the policy (as TRL does), so policy and reference agree at "
        "step 0 and the implicit rewards are not noise.",
    )
    margin: float = Field(
        0.0, ge=0.0, description="task=reward: Bradley-Terry margin m in -log sigma(r_w - r_l - m) (Llama 2)."
    )
    margin_field: str | None = Field(
        None, description="task=reward: a record field with a per-pair margin (overrides `margin` where present)."
    )
    head_init: Literal["random", "linear_probe"] = Field(
        "random",
        description="task=reward: how the new score head starts. 'linear_probe' (LP-FT for reward models): "
        "score each distinct training sequence once with the frozen model, fit a Bradley-Terry linear "
        "probe (scikit-learn logistic regression on feature differences), copy it into the head.",
    )

    @model_validator(mode="before")
    @classmethod
    def _paper_beta(cls, data: Any) -> Any:
        if isinstance(data, dict) and "beta" not in data:
            loss = data.get("loss", "dpo")
            if loss in DEFAULT_BETA:
                data = {**data, "beta": DEFAULT_BETA[loss]}
        return data

    def resolved_reference(self, method: str) -> str:
        """The reference strategy actually used for ``train.method`` (``'none'`` for SimPO/ORPO)."""
        if self.loss in REFERENCE_FREE:
            return "none"
        if self.reference == "auto":
            return "adapters_off" if method == "lora" else ("frozen_copy" if self.loss == "kto" else "precomputed")
        return self.reference

    def check_against(self, task: str, method: str) -> None:
        """Cross-field checks with the rest of the config; raises ValueError (pydantic reports the key)."""
        if task != "reward" and self.head_init != "random":
            raise ValueError("preference.head_init applies to task=reward (the reward model's new head)")
        if task == "dpo" and self.loss == "kto" and self.reference == "precomputed":
            raise ValueError("preference.reference=precomputed does not suit loss=kto (its mismatched pairs depend "
                             "on the batch); use 'auto', 'adapters_off' or 'frozen_copy'")
        if task == "dpo" and self.reference == "adapters_off" and method != "lora" and self.loss not in REFERENCE_FREE:
            raise ValueError(
                "preference.reference=adapters_off needs train.method=lora (with full or freeze fine-tuning "
                "use 'frozen_copy' or 'precomputed')"
            )
