"""Token reduction side by side: every method of the method table that runs on a model, on the same images.

``compare_reductions`` (``comparison``) is the one computation behind the token-reduction page (the page runs its
parts, ``reference_run`` and one ``method_run`` per method, separately so each is cached by its own settings); the
other modules turn its record into figures (plotly), images (PIL) and tables (pandas). Which models the page offers
and which methods run on each (``choices``) come from the registry and the method table (``models.methods``):
nothing here names a method. What the computation needs to know of a trace (tokens per block, whether it is
structured) the trace answers itself (``models.traces``); each method's figures are found by the type of its trace
(``views.FIGURES``): a new method is its forward and trace, its record in the table and its figures in ``views``
(drawn with ``pictures``). The agreement metrics and their chart are in ``metrics``. Nothing here imports streamlit.

Every DynamicViT family's trace is read as a ``DynamicStageTrace``: each pruning stage has its own grid and
its maps are drawn on the image with cells of ``image size / grid`` pixels. Two kinds of trace exist:
* nested (DeiT, LV-ViT): dropped tokens leave the sequence for good; a map shows the tokens still there.
* structured (ConvNeXt, Swin, ``nested`` False): the feature map stays whole; a map shows the positions that
  take the block's full (MLP) path, the others take the cheap fast path. Each stage picks its own set.
"""
from analysis.token_reduction.choices import (ModelChoice, absent_methods_note, choice_text, methods_running_on,
                                              model_choices, untrained_choice_label)
from analysis.token_reduction.comparison import (NO_REDUCTION, PREDICTORS_COLUMN, MethodRun, ReductionComparison,
                                                 agreement_frame, class_name, combine_runs, compare_reductions,
                                                 export_frame, method_run, method_setting, method_weights,
                                                 predictions_frame, prepared_trace, reduction_settings, reference_run,
                                                 run_title, setting_sweep, sweep_values, tokens_per_block,
                                                 tokens_per_block_figure, top5_frame)
from analysis.token_reduction.metrics import plot_agreement, top1_agreement, top5_overlap
from analysis.token_reduction.pictures import (NARROW_SCORES, dynamicvit_stage_panels, evit_attention_figure,
                                               evit_kept_frame, evit_stage_panels, fade_dropped_patches, image_strip,
                                               keep_frequency, keep_frequency_by_stage_figure, keep_frequency_figure,
                                               keep_score_figure, keep_score_note, keep_score_range,
                                               kept_indices_frame, stage_maps_caption, tome_merge_map_image,
                                               tome_merge_panels, truncation_notes)
from analysis.token_reduction.views import (FIGURES, Chart, Choice, MethodFigures, Note, Picture, Table, View,
                                            figures_for)

__all__ = [
    "ModelChoice", "absent_methods_note", "choice_text", "methods_running_on", "model_choices",
    "untrained_choice_label",
    "NO_REDUCTION", "PREDICTORS_COLUMN", "MethodRun", "ReductionComparison", "agreement_frame", "class_name",
    "combine_runs", "compare_reductions", "export_frame", "method_run", "method_setting", "method_weights",
    "predictions_frame", "prepared_trace", "reduction_settings", "reference_run", "run_title", "setting_sweep",
    "sweep_values", "tokens_per_block", "tokens_per_block_figure", "top5_frame",
    "plot_agreement", "top1_agreement", "top5_overlap",
    "NARROW_SCORES", "dynamicvit_stage_panels", "evit_attention_figure", "evit_kept_frame", "evit_stage_panels",
    "fade_dropped_patches", "image_strip", "keep_frequency", "keep_frequency_by_stage_figure", "keep_frequency_figure",
    "keep_score_figure", "keep_score_note", "keep_score_range", "kept_indices_frame", "stage_maps_caption",
    "tome_merge_map_image", "tome_merge_panels", "truncation_notes",
    "FIGURES", "Chart", "Choice", "MethodFigures", "Note", "Picture", "Table", "View", "figures_for",
]
