"""specvlm: learn, reproduce and measure SpecVLM (EMNLP 2025, arXiv 2508.16201).

Lossless speculative decoding for video LLMs where the draft sees only a pruned share of the
video tokens, chosen by the target's attention.

    import specvlm as sv
    pair = sv.load_pair("tiny")
    video = sv.sample_video("bigbuckbunny", num_frames=16)
    result = sv.generate(pair, video, "Describe the video.", method="specvlm", ratio=0.9)
"""

from . import replay, synthetic, views, widen
from .acceptance import greedy_chain, greedy_tree, sample_chain, sample_tree
from .attention import SCORES_ATTENTION, prefill_with_scores
from .builders import make_tiny_pair
from .decoding import METHODS, Result, generate, generate_ar, generate_sd
from .fast import generate_fast
from .models import Pair, Prompt, VideoLM, load_lm, load_pair
from .sampling import Picker
from .trees import MC_SIM_7B_63, Tree, chain, draw_tree
from .pruning import keep_budget, keep_random, keep_specvlm, keep_top, keep_uniform, keep_window, select
from .video import SAMPLE_CLIPS, Video, from_array, load_video, sample_video

__version__ = "0.1.0"
