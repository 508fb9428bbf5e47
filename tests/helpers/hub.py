"""A stand-in for ``huggingface_hub.HfApi`` that records the calls and what each upload held, without the network."""

from __future__ import annotations

import os
from concurrent.futures import Future

from huggingface_hub.utils import filter_repo_objects


def files_under(folder) -> list[str]:
    return sorted(os.path.relpath(os.path.join(root, f), folder) for root, _, fs in os.walk(folder) for f in fs)


class FakeHfApi:
    """Records Hub calls and what the uploaded folder held at upload time; never touches the network."""

    instances: list[FakeHfApi] = []

    def __init__(self, token=None, **kwargs):
        self.token = token
        self.calls: list[tuple[str, dict]] = []
        self.uploaded: dict[str, bytes] = {}
        FakeHfApi.instances.append(self)

    def create_repo(self, **kwargs):
        self.calls.append(("create_repo", kwargs))
        return f"https://huggingface.co/{kwargs['repo_id']}"

    def upload_folder(self, **kwargs):
        self.calls.append(("upload_folder", kwargs))
        folder = kwargs["folder_path"]
        prefix = kwargs.get("path_in_repo") or ""
        names = filter_repo_objects(files_under(folder), ignore_patterns=kwargs.get("ignore_patterns"))
        for name in names:  # what huggingface_hub would upload, as it was at the time of the call
            with open(os.path.join(folder, name), "rb") as f:
                self.uploaded[os.path.join(prefix, name)] = f.read()
        if kwargs.get("run_as_future"):
            future: Future = Future()
            future.set_result("commit-url")
            return future
        return "commit-url"

    def run_as_future(self, fn, *args, **kwargs):  # HfApi's background thread, run at once
        future: Future = Future()
        future.set_result(fn(*args, **kwargs))
        return future
