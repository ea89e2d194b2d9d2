import numpy as np
import pytest
from gymnasium import spaces

from sb3_qchunk.common.buffers import ChunkReplayBuffer, window_quantities

OBS_SPACE = spaces.Box(-1000.0, 1000.0, (1,), np.float32)
ACTION_SPACE = spaces.Box(-1.0, 1.0, (1,), np.float32)


def transitions(steps, offset=0.0, terminated_at=(), truncated_at=()):
    """Primitive transitions g in ``steps``: obs g + offset, next obs g + offset + 0.5, reward g + 1."""
    g = np.asarray(steps, dtype=np.float32)
    return {
        "obs": (g + offset)[:, None],
        "next_obs": (g + offset + 0.5)[:, None],
        "action": (g / 100.0)[:, None],
        "reward": g + 1.0,
        "terminated": np.isin(g, terminated_at),
        "truncated": np.isin(g, truncated_at),
    }


def all_windows(buffer, n=4000):
    """Sample many windows and key them by their first observation."""
    np.random.seed(0)
    data = buffer.sample(n)
    windows = {}
    for i in range(n):
        windows[float(data.observations[i, 0])] = dict(
            next_obs=float(data.next_observations[i, 0]),
            actions=data.actions[i, :, 0].numpy(),
            reward=float(data.rewards[i]),
            mask=float(data.masks[i]),
            valid=data.valid[i].numpy(),
        )
    return windows


def test_window_quantities_by_hand():
    rewards = np.array([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]])
    terminated = np.array([[0, 1, 0], [0, 0, 0]], dtype=np.float32)
    dones = np.array([[0, 1, 0], [0, 0, 1]], dtype=np.float32)
    cumulative, mask, valid = window_quantities(rewards, terminated, dones, gamma=0.5)
    np.testing.assert_allclose(cumulative, [1 + 1 + 0.75, 1 + 1 + 0.75])
    np.testing.assert_allclose(mask, [0.0, 1.0])
    np.testing.assert_allclose(valid, [[1, 1, 0], [1, 1, 1]])


def test_ring_windows_termination_truncation_and_boundary():
    # Ring of 8 steps, h = 3. Steps g = 0..10 are written in chunks of varying length, so the ring wraps:
    # it holds g = 3..10, the write position sits between g = 10 (newest) and g = 3 (oldest).
    buffer = ChunkReplayBuffer(8, OBS_SPACE, ACTION_SPACE, device="cpu", chunk_size=3, gamma=0.5)
    for chunk in ([0, 1, 2], [3, 4], [5, 6, 7], [8, 9, 10]):
        buffer.add(transitions(chunk, terminated_at=[4], truncated_at=[7]))
    assert buffer.fulls[0] and buffer.positions[0] == 3
    assert buffer.size() == 8 and buffer.num_windows() == 6
    windows = all_windows(buffer)
    # Only starts 3..8: nothing overwritten (g < 3) and nothing across the write position (g >= 9).
    assert sorted(windows) == [3.0, 4.0, 5.0, 6.0, 7.0, 8.0]
    expected = {
        # start: (R = r_g + 0.5 r_{g+1} + 0.25 r_{g+2}, mask, valid)
        3.0: (4 + 2.5 + 1.5, 0.0, [1, 1, 0]),  # crosses the termination at g = 4
        4.0: (5 + 3.0 + 1.75, 0.0, [1, 0, 0]),  # starts on the terminal step
        5.0: (6 + 3.5 + 2.0, 1.0, [1, 1, 1]),  # ends on the truncation: bootstraps from s'_7
        6.0: (7 + 4.0 + 2.25, 1.0, [1, 1, 0]),  # crosses the truncation at g = 7; wraps the array end
        7.0: (8 + 4.5 + 2.5, 1.0, [1, 0, 0]),
        8.0: (9 + 5.0 + 2.75, 1.0, [1, 1, 1]),  # at the ring boundary (array indices 0, 1, 2)
    }
    for start, (reward, mask, valid) in expected.items():
        window = windows[start]
        assert window["reward"] == pytest.approx(reward), start
        assert window["mask"] == mask, start
        np.testing.assert_array_equal(window["valid"], valid)
        assert window["next_obs"] == start + 2 + 0.5  # s'_{t+h-1}
        np.testing.assert_allclose(window["actions"], (start + np.arange(3)) / 100.0, rtol=1e-6)


def test_parallel_envs_never_mix_and_fill_independently():
    buffer = ChunkReplayBuffer(20, OBS_SPACE, ACTION_SPACE, device="cpu", n_envs=2, chunk_size=3, gamma=1.0)
    buffer.add(transitions([0, 1, 2, 3, 4]), env_idx=0)
    buffer.add(transitions([0, 1], offset=100.0), env_idx=1)  # env 1 has no complete window yet
    assert buffer.num_windows() == 3
    assert sorted(all_windows(buffer)) == [0.0, 1.0, 2.0]
    buffer.add(transitions([2, 3], offset=100.0), env_idx=1)
    windows = all_windows(buffer)
    assert sorted(windows) == [0.0, 1.0, 2.0, 100.0, 101.0]
    for start, window in windows.items():
        # every step of a window comes from the stream it started in
        assert window["next_obs"] == start + 2.5
        np.testing.assert_allclose(window["actions"], (start % 100 + np.arange(3)) / 100.0, rtol=1e-6)


def test_mark_episode_ends():
    buffer = ChunkReplayBuffer(10, OBS_SPACE, ACTION_SPACE, device="cpu", chunk_size=2, gamma=1.0)
    buffer.add(transitions([0, 1, 2]))
    buffer.mark_episode_ends()
    buffer.add(transitions([3, 4]))
    windows = all_windows(buffer)
    np.testing.assert_array_equal(windows[2.0]["valid"], [1, 0])  # no window bridges the reset
    np.testing.assert_array_equal(windows[1.0]["valid"], [1, 1])


def test_offline_block_uniform_and_symmetric_sampling():
    offline = {
        "observations": -np.arange(1, 11, dtype=np.float32)[:, None],
        "next_observations": -np.arange(1, 11, dtype=np.float32)[:, None] - 0.5,
        "actions": np.zeros((10, 1), dtype=np.float32),
        "rewards": np.ones(10, dtype=np.float32),
        # A terminal state in the middle of an episode that goes on (OGBench's success at step 2).
        "terminated": (np.arange(10) == 2).astype(np.float32),
        "terminals": (np.arange(10) % 5 == 4).astype(np.float32),
    }
    original = {k: v.copy() for k, v in offline.items()}
    buffer = ChunkReplayBuffer(100, OBS_SPACE, ACTION_SPACE, device="cpu", chunk_size=2, gamma=1.0)
    buffer.add_offline(offline)
    for key in offline:
        np.testing.assert_array_equal(offline[key], original[key])  # the user's arrays are untouched
    buffer.add(transitions(list(range(28))))
    assert buffer.num_windows() == 9 + 27 and buffer.size() == 38
    np.random.seed(0)
    data = buffer.sample(36_000)
    offline_share = float((data.observations[:, 0] < 0).float().mean())
    assert offline_share == pytest.approx(9 / 36, abs=0.01)
    # Episode ends inside the offline data cut its windows.
    is_end = data.observations[:, 0] == -5.0
    assert (data.valid[is_end, 1] == 0).all()
    # ...a terminal state does not: it zeroes the mask of the windows that contain it.
    at_success = data.observations[:, 0] == -3.0
    assert at_success.any() and (data.valid[at_success] == 1).all() and (data.masks[at_success] == 0).all()
    before = data.observations[:, 0] == -2.0
    assert (data.masks[before] == 0).all() and (data.masks[data.observations[:, 0] == -4.0] == 1).all()

    buffer.offline_fraction = 0.5
    data = buffer.sample(256)
    assert int((data.observations[:, 0] < 0).sum()) == 128


def mixed_buffer(**kwargs):
    """10 offline steps (obs -1 .. -10, one episode end at -5) and 28 online steps (obs 0 .. 27); h = 2, gamma = 1."""
    buffer = ChunkReplayBuffer(100, OBS_SPACE, ACTION_SPACE, device="cpu", chunk_size=2, gamma=1.0, **kwargs)
    buffer.add_offline(
        {
            "observations": -np.arange(1, 11, dtype=np.float32)[:, None],
            "next_observations": -np.arange(1, 11, dtype=np.float32)[:, None] - 0.5,
            "actions": np.zeros((10, 1), dtype=np.float32),
            "rewards": np.ones(10, dtype=np.float32),
            "terminated": np.zeros(10, dtype=np.float32),
            "terminals": (np.arange(10) == 4).astype(np.float32),
        }
    )
    buffer.add(transitions(list(range(28))))
    return buffer


@pytest.mark.parametrize("offline_fraction", [None, 0.25])
def test_sample_batches_are_independent_batches_of_whole_windows(offline_fraction):
    """Several batches drawn at once: each row one window (its fields from the same window), each batch drawn as
    ``sample`` draws one (the offline share per batch exact with ``offline_fraction``, uniform over all windows
    without), and one batch drawn this way is the batch ``sample`` draws from the same seed."""
    buffer = mixed_buffer(offline_fraction=offline_fraction)
    np.random.seed(0)
    batches = buffer.sample_batches(64, 300)
    assert len(batches) == 300
    offline_rows = []
    for batch in batches:
        assert batch.observations.shape == (64, 1) and batch.actions.shape == (64, 2, 1) and batch.valid.shape == (64, 2)
        obs, next_obs = batch.observations[:, 0], batch.next_observations[:, 0]
        offline = obs < 0
        np.testing.assert_array_equal(next_obs[offline], obs[offline] - 1.5)  # the next obs of the window's last step
        np.testing.assert_array_equal(next_obs[~offline], obs[~offline] + 1.5)
        np.testing.assert_allclose(batch.actions[~offline, 1, 0], (obs[~offline] + 1) / 100)
        np.testing.assert_array_equal(batch.rewards[~offline], 2 * obs[~offline] + 3)  # (g + 1) + (g + 2)
        np.testing.assert_array_equal(batch.valid[obs == -5.0, 1], 0.0)  # the offline episode ends there
        offline_rows.append(int(offline.sum()))
    if offline_fraction is None:
        assert np.mean(offline_rows) / 64 == pytest.approx(9 / 36, abs=0.01)
        assert len(set(offline_rows)) > 1  # drawn per window, not per batch
    else:
        assert set(offline_rows) == {16}
    seen = set(np.concatenate([batch.observations[:, 0].numpy() for batch in batches]).tolist())
    assert seen == set(range(-9, 0)) | set(range(27))  # every window of both sources, nothing else
    np.random.seed(1)
    single = buffer.sample_batches(32, 1)[0]
    np.random.seed(1)
    for got, want in zip(single, buffer.sample(32)):
        np.testing.assert_array_equal(got.numpy(), want.numpy())


def test_empty_buffer_sampling_error():
    buffer = ChunkReplayBuffer(10, OBS_SPACE, ACTION_SPACE, device="cpu", chunk_size=3)
    buffer.add(transitions([0, 1]))
    with pytest.raises(RuntimeError, match="no complete window of 3 steps"):
        buffer.sample(4)


def test_dict_observations():
    obs_space = spaces.Dict({"a": OBS_SPACE, "b": spaces.Box(0, 255, (2, 2), np.uint8)})
    buffer = ChunkReplayBuffer(10, obs_space, ACTION_SPACE, device="cpu", chunk_size=2)
    steps = transitions([0, 1, 2])
    image = np.arange(3, dtype=np.uint8)[:, None, None] * np.ones((3, 2, 2), dtype=np.uint8)
    steps["obs"] = {"a": steps["obs"], "b": image}
    steps["next_obs"] = {"a": steps["next_obs"], "b": image + 1}
    buffer.add(steps)
    assert buffer.observations["b"].dtype == np.uint8
    np.random.seed(0)
    for data in [buffer.sample(50), *buffer.sample_batches(20, 3)]:
        first = data.observations["a"][:, 0]
        assert (data.observations["b"][:, 0, 0] == first).all()
        assert (data.next_observations["b"][:, 0, 0] == first + 2).all()
        assert (data.next_observations["a"][:, 0] == first + 1.5).all()
