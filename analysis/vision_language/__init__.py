"""PuMer on a vision-language model (ViLT, METER) for one question: answers with and without reduction, what was
pruned and merged per reduce layer, measured speed-up and memory, figures and records. Importable without Streamlit.

The models come from the registry and their PuMer forwards from the method table (``models.methods``): every
registry model whose family has a PuMer record is offered (``pumer_models``). What differs per family and is not
a model property (what a trace column counts, layer presets, the small random model, how to fetch the weights)
is the table ``FAMILY_VIEWS``.

The package: ``records`` (settings and results), ``models`` (the models PuMer applies to, ``FAMILY_VIEWS``),
``compute`` (``answer_question``, ``benchmark_pumer``, ``paper_protocol``), ``tables`` (frames and the JSON
record), ``figures``."""
from analysis.vision_language.compute import (answer_question, batch_of, benchmark_pumer, correction_effects,
                                              display_tokens, image_cls_fates, numbered_answers, processed_image,
                                              top_answers)
from analysis.vision_language.compute import paper_protocol
from analysis.vision_language.figures import (for_display, merge_overlay, pruned_overlay, text_groups_html,
                                              token_counts_figure, tokens)
from analysis.vision_language.figures import protocol_figure
from analysis.vision_language.models import FAMILY_VIEWS, FamilyView, PuMerModel, pumer_models
from analysis.vision_language.records import (CORRECTION_ARGUMENTS, PUMER, CorrectionEffect, PuMerResult,
                                              PuMerSettings, PuMerSpeed, forward_defaults)
from analysis.vision_language.records import PuMerProtocol
from analysis.vision_language.tables import (answers_frame, corrections_frame, counts_frame, records_to_json,
                                             steps_frame)
from analysis.vision_language.tables import protocol_frame, protocol_to_json

__all__ = ["CORRECTION_ARGUMENTS", "FAMILY_VIEWS", "PUMER", "CorrectionEffect", "FamilyView", "PuMerModel",
           "PuMerResult", "PuMerSettings", "PuMerSpeed", "answer_question", "answers_frame", "batch_of",
           "benchmark_pumer", "correction_effects", "corrections_frame", "counts_frame", "display_tokens",
           "for_display", "forward_defaults", "image_cls_fates", "merge_overlay", "numbered_answers",
           "processed_image", "pruned_overlay", "pumer_models", "records_to_json", "steps_frame",
           "text_groups_html", "token_counts_figure", "tokens", "top_answers"]
# PuMer's throughput protocol (the paper's growing batch) and its records.
__all__ += ["PuMerProtocol", "paper_protocol", "protocol_figure", "protocol_frame", "protocol_to_json"]
