"""API keys (app/auth.py): real servers started with API_KEYS or API_KEYS_FILE, driven by the
`openai` SDK and raw HTTP. The right key serves, a wrong or missing one gets 401
`invalid_api_key` before anything else is looked at, the probes stay open, and no key ever
reaches the server's logs."""

from __future__ import annotations

import httpx
import numpy as np
import openai
import pytest

from app.auth import configured_keys
from app.settings import Settings
from tests.conftest import Server, english_wer
from tests.test_metrics import delta, scrape

KEYS = ("sk-auth-test-first-4f9c2a", "sk-auth-test-second-8d1e7b")
WRONG = "sk-auth-test-wrong-0a0a0a"
FILE_KEYS = ("file-key-one-77c1", "file-key-two-5e02")


def _assert_unauthorized(response: httpx.Response) -> None:
    assert response.status_code == 401, response.text
    assert response.headers["www-authenticate"] == "Bearer"
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == "invalid_api_key" and error["type"] == "invalid_request_error" and error["message"]


@pytest.fixture(scope="module")
def log(tmp_path_factory):
    return tmp_path_factory.mktemp("auth-log") / "server.log"


@pytest.fixture(scope="module")
def keyed(tmp_path_factory, log):
    """API_KEYS, everything logged (LOG_LEVEL=debug) to a file; a 2 MiB upload limit."""
    models_dir = tmp_path_factory.mktemp("models")
    env = dict(MODELS="tiny.en", DEFAULT_MODEL="tiny.en", MODELS_DIR=str(models_dir), MAX_UPLOAD_MB="2")
    with Server(log=log, API_KEYS=",".join(KEYS), LOG_LEVEL="debug", PYTHONUNBUFFERED="1", **env) as server:
        yield server


def _sdk(server: Server, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, timeout=120, max_retries=0)


def test_the_right_key_transcribes(keyed, clips):
    jfk = clips["jfk"]
    for key in KEYS:  # either configured key
        with jfk.path.open("rb") as f:
            result = _sdk(keyed, key).audio.transcriptions.create(model="tiny.en", file=f)
        assert english_wer([jfk.text], [result.text]) <= 0.05, result.text
    assert "tiny.en" in {m.id for m in _sdk(keyed, KEYS[0]).models.list()}


def test_a_wrong_key_is_an_authentication_error(keyed, clips):
    client = _sdk(keyed, WRONG)
    with pytest.raises(openai.AuthenticationError) as caught, clips["jfk"].path.open("rb") as f:
        client.audio.transcriptions.create(model="tiny.en", file=f)
    assert caught.value.status_code == 401 and caught.value.code == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError) as caught:
        client.models.list()
    assert caught.value.code == "invalid_api_key"


def test_no_key_is_401_everywhere_under_v1(keyed, clips):
    with httpx.Client(base_url=keyed.url, timeout=60) as http:
        files = {"file": ("jfk.flac", clips["jfk"].data)}
        _assert_unauthorized(http.post("/v1/audio/transcriptions", files=files, data={"model": "tiny.en"}))
        _assert_unauthorized(http.post("/v1/audio/translations", files=files))
        _assert_unauthorized(http.get("/v1/models"))
        _assert_unauthorized(http.get("/v1/models/tiny.en"))
        _assert_unauthorized(http.get("/v1/no-such-route"))  # 401, not 404: nothing is learned without a key
        # not a Bearer credential, an empty one, a key with something appended
        for authorization in (f"Basic {KEYS[0]}", "Bearer", f"Bearer {KEYS[0]}x", KEYS[0]):
            _assert_unauthorized(http.get("/v1/models", headers={"Authorization": authorization}))
        assert http.get("/v1/models", headers={"Authorization": f"bearer {KEYS[1]}"}).status_code == 200
        assert http.get("/v1/no-such-route", headers={"Authorization": f"Bearer {KEYS[1]}"}).status_code == 404


def test_an_oversized_upload_without_a_key_is_401_not_413(keyed):
    big = np.random.default_rng(3).bytes(3 * 1024 * 1024)  # over MAX_UPLOAD_MB=2
    with httpx.Client(base_url=keyed.url, timeout=60) as http:
        _assert_unauthorized(http.post("/v1/audio/transcriptions", files={"file": ("big.wav", big)}))
        keyed_response = http.post(
            "/v1/audio/transcriptions", files={"file": ("big.wav", big)}, headers={"Authorization": f"Bearer {KEYS[0]}"}
        )
        assert keyed_response.status_code == 413 and keyed_response.json()["error"]["code"] == "file_too_large"


def test_probes_and_metrics_stay_open(keyed):
    with httpx.Client(base_url=keyed.url, timeout=30) as http:
        for path in ("/health", "/ready"):
            assert http.get(path).status_code == 200
            assert http.head(path).status_code == 200
        metrics = http.get("/metrics")
        assert metrics.status_code == 200 and "whisper_requests_total" in metrics.text


def test_401s_are_counted_as_4xx(keyed):
    labels = dict(model="none", variant="none", endpoint="transcriptions", status="4xx")
    with httpx.Client(base_url=keyed.url, timeout=30) as http:
        before = scrape(http)
        for _ in range(3):
            _assert_unauthorized(http.post("/v1/audio/transcriptions", files={"file": ("a.wav", b"x")}))
        after = scrape(http)
    assert delta(before, after, "whisper_requests_total", **labels) == 3


def test_keys_never_reach_the_logs(keyed, log, clips):
    """Last in this module: every request above, plus one of each kind here, has been logged."""
    with httpx.Client(base_url=keyed.url, timeout=120) as http:
        for key in (*KEYS, WRONG):
            http.post(
                "/v1/audio/transcriptions", files={"file": ("jfk.flac", clips["jfk"].data)},
                data={"model": "tiny.en"}, headers={"Authorization": f"Bearer {key}"},
            )
    text = log.read_text(errors="replace")
    assert "/v1/audio/transcriptions" in text  # the access log is there: it just holds no key
    for secret in (*KEYS, WRONG):
        assert secret not in text
        assert secret[-6:] not in text  # nor a tail of one


# ------------------------------------------------------------------------------ API_KEYS_FILE


def test_keys_file_and_metrics_require_key(tmp_path):
    keys_file = tmp_path / "keys.txt"
    keys_file.write_text(f"# the team's keys\n\n  {FILE_KEYS[0]}  \n#{WRONG}\n{FILE_KEYS[1]}\n")
    env = dict(MODELS="tiny.en", DEFAULT_MODEL="tiny.en", MODELS_DIR=str(tmp_path))
    with Server(API_KEYS_FILE=str(keys_file), METRICS_REQUIRE_KEY="true", **env) as server:
        for key in FILE_KEYS:
            assert _sdk(server, key).models.retrieve("tiny.en").id == "tiny.en"
        for not_a_key in (WRONG, f"#{WRONG}", "# the team's keys"):
            with pytest.raises(openai.AuthenticationError):
                _sdk(server, not_a_key).models.list()
        with httpx.Client(base_url=server.url, timeout=30) as http:
            _assert_unauthorized(http.get("/metrics"))
            metrics = http.get("/metrics", headers={"Authorization": f"Bearer {FILE_KEYS[1]}"})
            assert metrics.status_code == 200 and "whisper_requests_total" in metrics.text
            assert http.get("/health").status_code == 200 and http.get("/ready").status_code == 200


def test_keys_from_both_settings_and_refusals(tmp_path):
    keys_file = tmp_path / "keys.txt"
    keys_file.write_text(f"{FILE_KEYS[0]}\n")
    settings = Settings(_env_file=None, api_keys=" a-key , another ,", api_keys_file=keys_file)
    assert configured_keys(settings) == ["a-key", "another", FILE_KEYS[0]]
    assert "a-key" not in repr(settings)  # settings may be logged: keys are left out of the repr
    assert configured_keys(Settings(_env_file=None)) == []
    # A file meant to protect the server that holds no key, or cannot be read, stops the start.
    (tmp_path / "empty.txt").write_text("# nothing yet\n\n")
    with pytest.raises(ValueError, match="holds no key"):
        configured_keys(Settings(_env_file=None, api_keys_file=tmp_path / "empty.txt"))
    with pytest.raises(ValueError, match="cannot be read"):
        configured_keys(Settings(_env_file=None, api_keys_file=tmp_path / "missing.txt"))
