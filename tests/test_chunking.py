import jax.numpy as jnp
import numpy as np

from drt_jax import chunking


def test_insert_and_remove_landmarks_round_trip():
    tokens = jnp.arange(1, 11)[None]  # T = 10, S = 4 -> 3 chunks, last one padded by 2
    slots = chunking.insert_landmarks(tokens, 4, landmark_id=99, pad_id=0)
    np.testing.assert_array_equal(slots[0], [1, 2, 3, 4, 99, 5, 6, 7, 8, 99, 9, 10, 0, 0, 99])
    back = chunking.remove_landmarks(slots[..., None], 4, 10)[..., 0]
    np.testing.assert_array_equal(back, tokens)
    np.testing.assert_array_equal(chunking.landmark_states(slots, 4), [[99, 99, 99]])


def test_token_to_slot_matches_insertion():
    tokens = jnp.arange(100, 117)[None]
    slots = chunking.insert_landmarks(tokens, 5, landmark_id=1, pad_id=0)
    for t in range(17):
        assert int(slots[0, chunking.token_to_slot(t, 5)]) == 100 + t
