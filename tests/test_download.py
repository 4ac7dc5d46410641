"""fastmnist.data.download against a local HTTP server on 127.0.0.1 serving generated files (no outside network):
success, checksum mismatch, interrupted transfer, files already present, mirror fallback."""

import hashlib
import http.server
import os
import socket
import threading

import pytest
import torch

from fastmnist.data import DATASETS, DownloadError, IDX_FILES, download, load_dataset, write_idx

NAMES = [stem + ".gz" for pair in IDX_FILES.values() for stem in pair]


class Server:
    """Serves `files` ({url path: bytes}); `modes` ({url path: "ok" | "truncate" | "404"}) changes a path's
    answer; `requests` logs every path asked; `during` ({url path: callable}) runs mid-transfer."""

    def __init__(self):
        self.files, self.modes, self.during, self.requests = {}, {}, {}, []
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                owner.requests.append(self.path)
                data = owner.files.get(self.path)
                mode = owner.modes.get(self.path, "ok")
                if data is None or mode == "404":
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                half = len(data) // 2
                self.wfile.write(data[:half])
                self.wfile.flush()
                if self.path in owner.during:
                    owner.during[self.path]()
                if mode == "truncate":
                    return  # HTTP/1.0: the connection closes with the body half sent
                self.wfile.write(data[half:])

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = Server()
    yield s
    s.close()


@pytest.fixture(scope="module")
def dataset_files(tmp_path_factory):
    """The four standard .gz files of a small generated dataset: {name: bytes}, and the tensors."""
    folder = tmp_path_factory.mktemp("generated")
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for split, n in (("train", 30), ("test", 12)):
        images = torch.randint(0, 256, (n, 28, 28), dtype=torch.uint8, generator=g)
        labels = torch.randint(0, 10, (n,), dtype=torch.uint8, generator=g)
        tensors[split] = (images, labels)
        for stem, t in zip(IDX_FILES[split], (images, labels)):
            write_idx(folder / (stem + ".gz"), t)
    return {n: (folder / n).read_bytes() for n in NAMES}, tensors


def md5(data):
    return hashlib.md5(data).hexdigest()


def serve(server, prefix, files):
    for name, data in files.items():
        server.files[f"/{prefix}/{name}"] = data


def raw_folder(root):
    return root / "MNIST" / "raw"


def test_download_and_load(server, dataset_files, tmp_path):
    files, tensors = dataset_files
    serve(server, "m", files)
    seen_mid_transfer = []
    target = raw_folder(tmp_path) / NAMES[0]
    server.during[f"/m/{NAMES[0]}"] = lambda: seen_mid_transfer.append(os.path.exists(target))
    log = []
    paths = download("mnist", tmp_path, mirrors=[server.url + "/m/"], md5={n: md5(d) for n, d in files.items()},
                     progress=False, log=log.append)
    assert seen_mid_transfer == [False]  # the real name appears only once the file is complete and checked
    assert [os.path.basename(p) for p in paths] == NAMES
    assert sorted(os.listdir(raw_folder(tmp_path))) == sorted(NAMES)  # no temporary files left
    for name in NAMES:
        assert (raw_folder(tmp_path) / name).read_bytes() == files[name]
    assert sorted(server.requests) == sorted(f"/m/{n}" for n in NAMES)
    assert any("downloading" in line for line in log)
    splits = load_dataset("mnist", tmp_path, log=None)
    assert torch.equal(splits.train.images, tensors["train"][0])
    assert torch.equal(splits.test.labels, tensors["test"][1].long())


def test_bad_checksum_leaves_nothing(server, dataset_files, tmp_path):
    files, _ = dataset_files
    name = NAMES[0]
    serve(server, "m", {name: files[name]})
    with pytest.raises(DownloadError, match=rf"(?s){name} could not be downloaded.*checksum mismatch"):
        download("mnist", tmp_path, mirrors=[server.url + "/m"], md5={name: "0" * 32}, progress=False, log=None)
    assert os.listdir(raw_folder(tmp_path)) == []


def test_interrupted_transfer_leaves_nothing(server, dataset_files, tmp_path):
    files, _ = dataset_files
    name = NAMES[0]
    serve(server, "m", {name: files[name]})
    server.modes[f"/m/{name}"] = "truncate"
    with pytest.raises(DownloadError, match=rf"(?s){name} could not be downloaded.*transfer interrupted: received"):
        download("mnist", tmp_path, mirrors=[server.url + "/m/"], md5={name: md5(files[name])}, progress=False,
                 log=None)
    assert os.listdir(raw_folder(tmp_path)) == []


def test_present_valid_file_is_skipped_and_invalid_one_replaced(server, dataset_files, tmp_path):
    files, _ = dataset_files
    serve(server, "m", files)
    folder = raw_folder(tmp_path)
    folder.mkdir(parents=True)
    (folder / NAMES[0]).write_bytes(files[NAMES[0]])  # valid
    (folder / NAMES[1]).write_bytes(b"garbage")  # present but wrong: fetched again
    log = []
    download("mnist", tmp_path, mirrors=[server.url + "/m/"], md5={n: md5(d) for n, d in files.items()},
             progress=False, log=log.append)
    assert f"/m/{NAMES[0]}" not in server.requests
    assert sorted(server.requests) == sorted(f"/m/{n}" for n in NAMES[1:])
    assert (folder / NAMES[1]).read_bytes() == files[NAMES[1]]
    assert any("already present" in line for line in log)
    server.requests.clear()
    download("mnist", tmp_path, mirrors=[server.url + "/m/"], md5={n: md5(d) for n, d in files.items()},
             progress=False, log=None)
    assert server.requests == []  # all present: no request at all


def closed_port_url():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/"


@pytest.mark.parametrize("failure", ["404", "truncate", "bad_checksum", "refused"])
def test_mirror_fallback(server, dataset_files, tmp_path, failure):
    files, _ = dataset_files
    name = NAMES[1]
    serve(server, "b", {name: files[name]})
    if failure == "refused":
        first = closed_port_url()
    else:
        serve(server, "a", {name: b"wrong bytes" if failure == "bad_checksum" else files[name]})
        server.modes[f"/a/{name}"] = failure if failure != "bad_checksum" else "ok"
        first = server.url + "/a/"
    log = []
    download("mnist", tmp_path, mirrors=[first, server.url + "/b/"], md5={name: md5(files[name])}, progress=False,
             log=log.append)
    assert (raw_folder(tmp_path) / name).read_bytes() == files[name]
    assert os.listdir(raw_folder(tmp_path)) == [name]
    assert server.requests[-1] == f"/b/{name}"
    assert any("failed" in line for line in log)


def test_all_mirrors_fail(server, dataset_files, tmp_path):
    name = NAMES[2]
    with pytest.raises(DownloadError, match=rf"(?s){name}.*/a/{name}: HTTP Error 404.*/b/{name}: HTTP Error 404"):
        download("fashion-mnist", tmp_path, mirrors=[server.url + "/a/", server.url + "/b/"], md5={name: "0" * 32},
                 progress=False, log=None)
    assert os.listdir(tmp_path / "FashionMNIST" / "raw") == []


def test_catalog_defaults():
    mnist, fashion = DATASETS["mnist"], DATASETS["fashion-mnist"]
    assert mnist.mirrors[0] == "https://ossci-datasets.s3.amazonaws.com/mnist/"
    assert mnist.mirrors[1] == "http://yann.lecun.com/exdb/mnist/"
    assert fashion.mirrors == ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",)
    for info in (mnist, fashion):
        assert list(info.md5) == NAMES
        assert all(len(v) == 32 and int(v, 16) >= 0 for v in info.md5.values())
    assert len(set(mnist.md5.values()) | set(fashion.md5.values())) == 8
    with pytest.raises(ValueError, match="mirrors must not be empty"):
        download("mnist", "unused", mirrors=[], log=None)
