"""The attribution logic both probes share, on hand-made allocation traces."""

from harness.probes.timeline import (
    Kind,
    Phase,
    analyse,
    attach_sightings,
    build_blocks,
    round_block,
)


def test_round_block_follows_cuda_512_byte_rounding():
    assert [round_block(n) for n in (0, 1, 511, 512, 513, 4096)] == [0, 512, 512, 512, 1024, 4096]


def _phases():
    return [Phase("load", None, 0, 10), Phase("forward", 0, 10, 20),
            Phase("backward", 0, 20, 30), Phase("optimizer", 0, 30, 40)]


def test_phase_peaks_and_breakdown_at_the_peak():
    allocations = [
        (1, 0xA, 4096),     # param, whole run
        (11, 0xB, 2048),    # saved for backward, freed in backward
        (12, 0xC, 1024),    # forward temporary, freed in forward
        (13, 0xC, -1024),
        (14, 0xD, 8192),    # checkpointed input: created in forward, alive into backward
        (21, 0xE, 512),     # grad
        (22, 0xF, 16384),   # workspace no tensor names, the peak
        (23, 0xF, -16384),
        (24, 0xB, -2048),
        (25, 0xD, -8192),
        (31, 0x10, 8192),   # optimizer state
        (0, 0x99, -4096),   # free of a block allocated before recording: ignored
    ]
    blocks = build_blocks(allocations)
    attach_sightings(blocks, [(2, 0xA, Kind.PARAM), (11, 0xB, Kind.TENSOR), (11, 0xB, Kind.SAVED),
                              (12, 0xC, Kind.TENSOR), (14, 0xD, Kind.TENSOR),
                              (21, 0xE, Kind.TENSOR), (21, 0xE, Kind.GRAD),
                              (32, 0x10, Kind.OPTIMIZER),
                              (11, 0xA, Kind.SAVED)])  # a weight saved for backward stays a param
    analysis = analyse(blocks, _phases())
    peaks = {p.name: peak for p, peak in analysis.phase_peaks}
    assert peaks == {"load": 4096, "forward": 4096 + 2048 + 8192,
                     "backward": 4096 + 2048 + 8192 + 512 + 16384, "optimizer": 4096 + 512 + 8192}
    assert analysis.peak_phase.name == "backward"
    assert analysis.peak_bytes == 4096 + 2048 + 8192 + 512 + 16384
    assert analysis.breakdown == {"params": 4096, "grads": 512, "optimizer": 0,
                                  "activations": 2048 + 8192, "vision_activations": 0,
                                  "kv_cache": 0, "other": 0,
                                  "unattributed": 16384}
    assert analysis.end_of_step == {"params": 4096, "grads": 512, "optimizer": 8192,
                                    "activations": 0, "vision_activations": 0, "kv_cache": 0,
                                    "other": 0,
                                    "unattributed": 0}


def test_what_the_image_encoder_made_in_forward_is_its_own_activations():
    """A vision-language model's image encoder runs first in forward (a window, Probe.windows):
    what it made there and backward still needs is `vision_activations`, the rest of the
    activations stay `activations`; the parameter it saved stays a parameter."""
    blocks = build_blocks([(1, 0xA, 4096), (11, 0xB, 2048), (14, 0xD, 8192), (22, 0xF, 512),
                           (24, 0xB, -2048), (25, 0xD, -8192)])
    attach_sightings(blocks, [(2, 0xA, Kind.PARAM), (11, 0xA, Kind.SAVED),
                              (11, 0xB, Kind.SAVED), (14, 0xD, Kind.TENSOR)])
    analysis = analyse(blocks, _phases(), [Phase("vision", None, 10, 12)])
    assert analysis.breakdown == {"params": 4096, "grads": 0, "optimizer": 0,
                                  "activations": 8192, "vision_activations": 2048,
                                  "kv_cache": 0, "other": 0, "unattributed": 512}


def test_reused_address_gets_the_kind_of_the_block_live_at_the_sighting():
    blocks = build_blocks([(1, 0xA, 1024), (2, 0xA, -1024), (3, 0xA, 1024)])
    attach_sightings(blocks, [(1, 0xA, Kind.PARAM), (3, 0xA, Kind.OPTIMIZER)])
    assert [b.kind for b in blocks] == [Kind.PARAM, Kind.OPTIMIZER]
