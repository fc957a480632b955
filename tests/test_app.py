"""The web app over real HTTP: a real uvicorn server on 127.0.0.1 (in this process, on its own thread) over the
tiny real index, driven by a real HTTP client with real pictures from ../shared/data/real-pictures.

Checked: a real picture gets digitised traces, measurements, neighbours and a report whose citations are among
them, and every download is what it says (the WFDB record reads back as 12 leads in mV); a text file named .png,
a picture with no ECG on it and a lone .hea get the CLI's one-line errors (400); oversize uploads 413, with or
without a Content-Length; concurrent uploads are all answered; past the queue's limit a request is told to come
back (503) and the queued one still gets its answer; no index, or a port in use, is one line; with an LLM reader
configured (a real OpenAI-compatible server) the report is its answer, citations checked.
"""
from __future__ import annotations

import io
import json
import threading
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import wfdb
from PIL import Image
from typer.testing import CliRunner

from cli import app as cli_app
from rag_ecg.app.analysis import Analyzer
from rag_ecg.app.server import WorkQueue, bind, create_app, server_for
from rag_ecg.app.uploads import list_examples
from rag_ecg.data.images import ImageLoadError, load_image
from tests.openai_server import OpenAITestServer
from tests.rag_ecg.reader.test_report import GOOD_JSON, answer

PICTURE = "khan/HMI_0011.jpg"  # a real hospital printout scan (3x4 + a lead III rhythm strip), 2213x1572
SMALL = "assorted/ecg00006.png"  # a real 3x4 printout, 1380x730 (one of the examples offered)


@pytest.fixture(scope="session")
def real_pictures(shared_data) -> Path:
    root = shared_data / "real-pictures"
    if not (root / PICTURE).is_file():
        pytest.fail(f"{root / PICTURE} missing: the shared data's real pictures are part of the test data")
    return root


class Running:
    """A real server for `app` on a free port of 127.0.0.1, on a thread; `stop()` shuts it down cleanly."""

    def __init__(self, app):
        self.app = app
        self.sock = bind("127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = server_for(app)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        with httpx.Client() as c:  # wait until it answers (the loop starts in the thread)
            for _ in range(600):
                try:
                    if c.get(self.url + "/", timeout=5).status_code == 200:
                        break
                except httpx.TransportError:
                    threading.Event().wait(0.05)

    @property
    def state(self):
        return self.app.state.rag_ecg

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()


def start_app(tiny_index, real_pictures, **kw) -> Running:
    queue = WorkQueue(kw.pop("max_waiting", 8))
    analyzer = queue.call(Analyzer.open, tiny_index["index"], tiny_index["db"])
    return Running(create_app(analyzer, queue=queue, examples=list_examples(real_pictures), **kw))


@pytest.fixture(scope="module")
def app_server(tiny_index, real_pictures):
    running = start_app(tiny_index, real_pictures)
    yield running
    running.stop()


def post(url: str, files: list[tuple[str, bytes]], **kw) -> httpx.Response:
    return httpx.post(url, files=[("file", (name, data)) for name, data in files], timeout=300, **kw)


def test_a_real_picture_gets_traces_measurements_neighbours_and_a_cited_report(app_server, real_pictures, tmp_path):
    pic = real_pictures / PICTURE
    res = post(app_server.url + "/api/analyze", [(pic.name, pic.read_bytes())])
    assert res.status_code == 200, res.text
    out = res.json()
    assert out["name"] == pic.name and out["digitized"]["layout"] == "3x4+III"  # the strip printed here is III
    ids = [n["case_id"] for n in out["neighbours"]]
    assert len(ids) == 8 and len(set(ids)) == 8
    assert out["cited_case_ids"] and set(out["cited_case_ids"]) <= set(ids)
    assert out["measurements"]["error"] is None and 30 < out["measurements"]["heart_rate_bpm"] < 200
    assert all(n["findings"] for n in out["neighbours"])  # English statements of the codes each case carries

    # the page shows them: overlay, every neighbour's card (cited ones marked), the report's citations
    page = httpx.get(app_server.url + out["page"]).text
    assert f'src="{out["page"]}/overlay.png"' in page
    for cid in ids:
        assert f'data-case-id="{cid}"' in page
    for cid in out["cited_case_ids"]:
        assert f'class="case cited" data-case-id="{cid}"' in page
    assert "http://" not in page and "https://" not in page  # nothing from outside this server

    with httpx.Client(base_url=app_server.url) as c:
        overlay = c.get(out["downloads"]["overlay.png"])
        with Image.open(io.BytesIO(overlay.content)) as im:
            assert im.size == load_image(pic).size  # the traces drawn over the picture itself
        case = c.get(out["neighbours"][0]["image"])
        assert case.headers["content-type"] == "image/jpeg" and case.content[:2] == b"\xff\xd8"
        report = c.get(out["downloads"]["report.json"])
        assert "attachment" in report.headers["content-disposition"]
        assert json.loads(report.text)["retrieval"]["cases"][0]["case_id"] == ids[0]
        html = c.get(out["downloads"]["report.html"]).text
        assert html.startswith("<!DOCTYPE html>") and f"case {out['cited_case_ids'][0]}" in html
        record = c.get(out["downloads"]["record.zip"])
    folder = tmp_path / "unzipped"
    with zipfile.ZipFile(io.BytesIO(record.content)) as z:
        assert sorted(z.namelist()) == ["HMI_0011.dat", "HMI_0011.hea", "HMI_0011.json"]
        z.extractall(folder)
    rec = wfdb.rdrecord(str(folder / "HMI_0011"))
    assert rec.fs == 500 and rec.sig_name[:3] == ["I", "II", "III"] and set(rec.units) == {"mV"}
    assert np.isfinite(rec.p_signal).any(axis=0).all()  # every lead of a 3x4 + strip page holds samples
    assert np.isfinite(rec.p_signal[:, 2]).mean() > 0.95  # lead III: (about) the whole 10 s, from the strip
    assert json.loads((folder / "HMI_0011.json").read_text())["layout"] == "3x4+III"


def test_bad_files_get_the_cli_one_line_errors(app_server, tmp_path):
    fake = tmp_path / "notes.png"
    fake.write_text("Patient list, not a picture\n")
    with pytest.raises(ImageLoadError) as cli_error:  # what `cli.py report notes.png` prints after "error: "
        load_image(fake)
    res = post(app_server.url + "/api/analyze", [("notes.png", fake.read_bytes())])
    assert res.status_code == 400 and res.json() == {"error": str(cli_error.value)}
    assert "notes.png: not an image (looks like text" in res.json()["error"]

    # the HTML form gets the same line on the start page, escaped, the name as sent
    res = post(app_server.url + "/analyze", [("<img src=x onerror=alert(1)>.png", b"Patient list\n")])
    assert res.status_code == 400 and "<img src=x" not in res.text
    assert "error: &lt;img src=x onerror=alert(1)&gt;.png: not an image (looks like text" in res.text

    rng = np.random.default_rng(0)  # a real picture of no ECG: the digitiser's check, as in `cli.py report`
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (600, 800, 3), dtype=np.uint8)).save(buf, "PNG")
    res = post(app_server.url + "/api/analyze", [("noise.png", buf.getvalue())])
    assert res.status_code == 400 and res.json()["error"].startswith("noise.png: no readable ECG traces")

    res = post(app_server.url + "/api/analyze", [("04385_lr.hea", b"04385_lr 12 100 1000\n")])
    assert res.status_code == 400 and "04385_lr.hea: a WFDB record needs its signal file too" in res.json()["error"]
    res = httpx.post(app_server.url + "/api/analyze", data={"example": "../../etc/passwd"})
    assert res.status_code == 400 and res.json()["error"] == "../../etc/passwd: not one of the examples offered"
    for field, line in ((("age", "fifty"), "age 'fifty' is not a number of years"), (("sex", "X"), "sex 'X'")):
        res = post(app_server.url + "/api/analyze", [("notes.png", fake.read_bytes())], data=dict([field]))
        assert res.status_code == 400 and res.json()["error"].startswith(line)


def test_a_wfdb_record_and_an_example_are_read(app_server, ptbxl_dir):
    rec = ptbxl_dir / "records100" / "04385_lr"
    res = post(app_server.url + "/api/analyze", [(f"04385_lr{s}", rec.with_suffix(s).read_bytes()) for s in (".hea", ".dat")])
    assert res.status_code == 200, res.text
    out = res.json()
    assert out["notes"] and "drawn as a clean page" in out["notes"][0]
    assert out["measurements"]["error"] is None and len(out["neighbours"]) == 8
    assert out["measurements"]["sex"] == "F"  # its header says "sex: female"
    res = post(app_server.url + "/api/analyze", [(f"04385_lr{s}", rec.with_suffix(s).read_bytes()) for s in (".hea", ".dat")],
               data={"sex": "M", "age": "35"})  # what the user says of the patient wins over the header
    assert res.status_code == 200 and res.json()["measurements"]["sex"] == "M"
    assert 'name="sex"' in httpx.get(app_server.url + "/").text

    examples = app_server.state.examples  # a few of each folder of real pictures
    assert {x.key.split("/")[0] for x in examples} == {"assorted", "khan"}
    home = httpx.get(app_server.url + "/").text
    assert all(f'value="{x.key}"' in home for x in examples)
    res = httpx.post(app_server.url + "/analyze", data={"example": SMALL}, timeout=300)
    assert res.status_code == 303 and res.headers["location"].startswith("/r/")
    assert "ecg00006.png: digitised traces" in httpx.get(app_server.url + res.headers["location"]).text


def test_oversize_uploads_are_refused_with_413(tiny_index, real_pictures):
    running = start_app(tiny_index, real_pictures, max_upload_mb=1)
    try:
        big = (real_pictures / PICTURE).read_bytes() * 3  # > 1 MB
        assert len(big) > 1024 * 1024
        line = "upload too large (limit 1 MB): upload one ECG picture, PDF or WFDB record"
        res = post(running.url + "/api/analyze", [("big.jpg", big)])
        assert res.status_code == 413 and res.json() == {"error": line}

        def chunks():  # no Content-Length: the server counts as the body arrives
            yield b'--x\r\nContent-Disposition: form-data; name="file"; filename="big.jpg"\r\n\r\n'
            for i in range(0, len(big), 256 * 1024):
                yield big[i:i + 256 * 1024]
            yield b"\r\n--x--\r\n"

        res = httpx.post(running.url + "/api/analyze", content=chunks(), timeout=60,
                         headers={"content-type": "multipart/form-data; boundary=x"})
        assert res.status_code == 413 and res.json() == {"error": line}
        res = post(running.url + "/analyze", [("big.jpg", big)])
        assert res.status_code == 413 and f"error: {line}" in res.text
        assert running.state.queue.waiting == 0  # nothing was queued for them
    finally:
        running.stop()


def test_concurrent_uploads_are_queued_and_all_answered(app_server, real_pictures):
    pics = [real_pictures / PICTURE, real_pictures / SMALL]
    with ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(lambda p: post(app_server.url + "/api/analyze", [(p.name, p.read_bytes())]), pics))
    assert [a.status_code for a in answers] == [200, 200], [a.text[:200] for a in answers]
    assert len({a.json()["id"] for a in answers}) == 2
    for pic, got in zip(pics, answers):  # each got the answer to its own picture
        assert got.json()["name"] == pic.name
        assert got.json()["digitized"]["picture_size"] == list(load_image(pic).size)


def test_past_the_queue_limit_a_request_is_told_to_come_back(tiny_index, real_pictures):
    running = start_app(tiny_index, real_pictures, max_waiting=1)
    release = threading.Event()
    running.state.queue.executor.submit(release.wait)  # the worker is busy with an earlier job
    pic = real_pictures / PICTURE
    try:
        with ThreadPoolExecutor(1) as pool:
            first = pool.submit(post, running.url + "/api/analyze", [(pic.name, pic.read_bytes())])
            while running.state.queue.waiting < 1 and not first.done():  # it is queued behind that job
                threading.Event().wait(0.02)
            second = post(running.url + "/api/analyze", [(pic.name, pic.read_bytes())])
            assert second.status_code == 503
            assert second.json()["error"] == "busy: 1 analyses are queued already; try again in a minute"
            release.set()
            assert first.result().status_code == 200
    finally:
        release.set()
        running.stop()


def test_no_index_and_a_busy_port_are_one_line(tmp_path, app_server):
    res = CliRunner().invoke(cli_app, ["serve", "--index", str(tmp_path / "nothing"), "--port", "0"])
    assert res.exit_code == 4 and res.output.startswith("error: ") and len(res.output.strip().splitlines()) == 1
    assert f"no index at {tmp_path / 'nothing'}: run `python cli.py quickstart` first" in " ".join(res.output.split())
    port = app_server.url.rsplit(":", 1)[1]
    index = str(app_server.state.analyzer.retriever.index_dir)
    res = CliRunner().invoke(cli_app, ["serve", "--index", index, "--db", app_server.state.analyzer.retriever.store.url,
                                       "--port", port])
    assert res.exit_code == 2 and res.output.startswith("error: ") and len(res.output.strip().splitlines()) == 1
    assert f"cannot listen on 127.0.0.1:{port}" in " ".join(res.output.split())


def test_an_llm_reader_when_configured_and_its_citations_checked(tiny_index, real_pictures):
    """`serve --backend vllm`: a real OpenAI-compatible server answers. Free text (twice: answer and retry) is
    shown as the unparsed answer; a JSON answer's citation of a case that was not retrieved is dropped by the
    check and shown as dropped, the kept ones are the retrieved cases it cited."""
    with OpenAITestServer(replies=["no JSON here", "still no JSON"]) as llm:
        queue = WorkQueue()
        analyzer = queue.call(Analyzer.open, tiny_index["index"], tiny_index["db"], "vllm",
                              {"base_url": llm.url, "max_retries": 0})
        running = Running(create_app(analyzer, queue=queue, examples=[]))
        pic = real_pictures / SMALL
        try:
            first = post(running.url + "/api/analyze", [(pic.name, pic.read_bytes())]).json()
            assert first["report"]["backend"] == "vllm" and first["report"]["parsed"] is False
            assert "Unparsed answer" in httpx.get(running.url + first["page"]).text
            ids = [n["case_id"] for n in first["neighbours"]]  # the same picture retrieves the same cases

            reply = json.loads(json.dumps(GOOD_JSON))
            reply["findings"] = [{"text": "Left axis deviation", "cited": ids[:3]}]
            for part in [reply["rhythm"]] + reply["diagnoses"]:
                part["cited"] = ids[:3]
            reply["impression"]["cited"] = [987654]  # retrieved by no one
            llm.replies.append(answer(reply))
            res = post(running.url + "/api/analyze", [(pic.name, pic.read_bytes())])
            assert res.status_code == 200, res.text
            out = res.json()
            assert out["report"]["parsed"] and len(llm.requests) == 3
            assert [n["case_id"] for n in out["neighbours"]] == ids and out["cited_case_ids"] == ids[:3]
            assert [d["unknown"] for d in out["report"]["dropped_citations"]] == [[987654]]
            page = httpx.get(running.url + out["page"]).text
            assert "reader: <b>vllm</b>" in page and "Removed by the citation check" in page
            for cid in ids[:3]:
                assert f'class="case cited" data-case-id="{cid}"' in page
        finally:
            running.stop()
