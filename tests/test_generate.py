"""Text to image: schedule, guidance, seeding, batching and bad input."""

import numpy as np
import pytest
import torch

from harmon.generate import cfg_scale_at, mask_len_schedule, to_uint8

REVEALED_1024_64 = [1, 1, 1, 2, 3, 4, 4, 4, 5, 6, 7, 7, 7, 8, 9, 9, 10, 11, 11, 11, 13, 12, 13, 14,
                    14, 15, 15, 16, 16, 17, 17, 17, 18, 19, 19, 19, 20, 20, 20, 21, 21, 21, 22, 22,
                    22, 23, 23, 23, 23, 24, 23, 24, 24, 25, 24, 25, 24, 25, 25, 25, 25, 25, 25, 25]


def revealed(N, K):
    masked = [N] + mask_len_schedule(N, K)
    return [a - b for a, b in zip(masked, masked[1:])]


def test_mask_schedule_matches_reference_lists():
    assert revealed(1024, 64) == REVEALED_1024_64
    r = revealed(256, 64)
    assert r[:13] == [1] * 13 and r[13:18] == [2, 3, 2, 2, 3] and sum(r) == 256
    assert max(r) == 7 and all(x >= 1 for x in r)


def test_fixture_schedules():
    # p_k of fixture case 06
    assert revealed(16, 4) == [2, 3, 5, 6]
    assert revealed(64, 8) == [2, 3, 6, 8, 10, 11, 12, 12]


def test_schedule_clamps_when_steps_equal_tokens():
    assert revealed(16, 16) == [1] * 16


def test_linear_cfg_values():
    # the linear run of fixture case 06 (N=16, K=4)
    lens = mask_len_schedule(16, 4)[:-1] + [1]
    assert [cfg_scale_at(3.0, "linear", m, 16) for m in lens] == [1.25, 1.625, 2.25, 2.875]
    assert cfg_scale_at(3.0, "constant", 5, 16) == 3.0
    with pytest.raises(ValueError, match="cfg schedule"):
        cfg_scale_at(3.0, "cosine", 5, 16)


def test_to_uint8_truncates_with_offset_128():
    x = torch.tensor([-1.0, 0.0, 0.999, 1.0, 2.0]).reshape(1, 1, 1, 5).expand(1, 3, 1, 5)
    assert to_uint8(x)[0, 0, :, 0].tolist() == [0, 128, 255, 255, 255]


def test_same_seed_same_images_different_seed_different(tiny_harmon):
    a = tiny_harmon.generate("a red circle", steps=4, seed=3, output="uint8")
    b = tiny_harmon.generate("a red circle", steps=4, seed=3, output="uint8")
    c = tiny_harmon.generate("a red circle", steps=4, seed=4, output="uint8")
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_generator_argument_equals_seed(tiny_harmon):
    a = tiny_harmon.generate("x", steps=3, seed=11, output="uint8")
    b = tiny_harmon.generate("x", steps=3, generator=torch.Generator().manual_seed(11),
                             output="uint8")
    assert torch.equal(a, b)


def test_batched_prompts_and_images_per_prompt(tiny_harmon):
    images = tiny_harmon.generate(["a red circle", "two blue squares"], num_images_per_prompt=3,
                                  steps=4, seed=0)
    assert len(images) == 6 and images[0].size == (64, 64) and images[0].mode == "RGB"
    arrays = [np.asarray(im) for im in images]
    assert not np.array_equal(arrays[0], arrays[1])  # own orders and noise per image


def test_rectangular_size_and_no_guidance(tiny_harmon):
    out = tiny_harmon.generate("a star", size=(32, 64), steps=2, cfg=1.0, seed=0, output="uint8")
    assert out.shape == (1, 32, 64, 3) and out.dtype == torch.uint8


def test_linear_schedule_and_temperature_run(tiny_harmon):
    out = tiny_harmon.generate("a star", steps=3, cfg=2.0, cfg_schedule="linear",
                               temperature=0.7, seed=0, output="uint8")
    assert out.shape == (1, 64, 64, 3)


def test_on_step_sees_every_step(tiny_harmon):
    seen = []
    tiny_harmon.generate("a", steps=5, seed=0, on_step=lambda info: seen.append(
        (info.step, int(info.mask[0].sum()))))
    assert [s for s, _ in seen] == [0, 1, 2, 3, 4] and seen[-1][1] == 0
    assert all(a[1] > b[1] for a, b in zip(seen, seen[1:]))


@pytest.mark.parametrize("kwargs, match", [
    (dict(prompts=[]), "no prompt"),
    (dict(prompts=["  "]), "empty prompt"),
    (dict(prompts=["a"], size=40), "multiple of 16"),
    (dict(prompts=["a"], size=(64, 0)), "multiple of 16"),
    (dict(prompts=["a"], cfg=0.5), "cfg must be a finite number >= 1"),
    (dict(prompts=["a"], cfg=float("nan")), "cfg must be a finite number"),
    (dict(prompts=["a"], steps=0), r"steps must be an integer in \[1, 16\]"),
    (dict(prompts=["a"], steps=17), r"steps must be an integer in \[1, 16\]"),
    (dict(prompts=["a"], steps=4.5), "steps must be an integer"),
    (dict(prompts=["a"], size=48.0), "size must be an int"),
    (dict(prompts=["a"], size=(64, 64, 3)), "size must be an int"),
    (dict(prompts=["a"], temperature=0.0), "temperature"),
    (dict(prompts=["a"], temperature=float("inf")), "temperature"),
    (dict(prompts=["a"], num_images_per_prompt=0), "num_images_per_prompt"),
    (dict(prompts=[3]), "must be a string"),
])
def test_bad_input_is_a_clear_error(tiny_harmon, kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        tiny_harmon.generate(**kwargs)


def test_overlong_prompt_is_truncated_with_warning(tiny_harmon):
    with pytest.warns(UserWarning, match="truncated to 128"):
        ids = tiny_harmon.tokenizer.generation_ids("red " * 200)
    assert len(ids) == 128
    assert ids[-3:] == tiny_harmon.tokenizer.encode("<|im_end|>\n<|im_start|>assistant\n")[-3:]


def test_steps_default_to_64_or_the_token_count(tiny_harmon):
    seen = []
    tiny_harmon.generate("a", size=64, seed=0, on_step=lambda info: seen.append(info.num_steps))
    assert seen[0] == 16  # a 4x4 grid: one token a step
    seen.clear()
    tiny_harmon.generate("a", size=(128, 160), seed=0, on_step=lambda i: seen.append(i.num_steps))
    assert seen[0] == 64  # 8x10 tokens: the paper's K
    import numpy as np
    assert tiny_harmon.generate("a", size=np.int64(64), steps=np.int64(2), output="uint8").shape \
        == (1, 64, 64, 3)  # numpy integers are integers
