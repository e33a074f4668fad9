"""Local paths and s3:// URIs behind one pyarrow filesystem interface."""
from __future__ import annotations

import os
import uuid
from dataclasses import dataclass, field
from urllib.parse import urlparse

import pyarrow.fs as pafs


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


@dataclass(frozen=True)
class StorageOptions:
    """How to reach S3-compatible storage; picklable so workers get the driver's settings.

    Credentials default to the standard AWS environment variables of the process
    that builds the options (the job driver), so workers on other nodes use them too.
    """

    endpoint_url: str | None = None
    region: str | None = None
    access_key: str | None = field(default=None, repr=False)
    secret_key: str | None = field(default=None, repr=False)
    session_token: str | None = field(default=None, repr=False)

    @classmethod
    def from_env(cls, endpoint_url: str | None = None) -> "StorageOptions":
        env = os.environ
        return cls(
            endpoint_url=endpoint_url or env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL"),
            region=env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION"),
            access_key=env.get("AWS_ACCESS_KEY_ID"),
            secret_key=env.get("AWS_SECRET_ACCESS_KEY"),
            session_token=env.get("AWS_SESSION_TOKEN"),
        )

    def s3(self) -> pafs.S3FileSystem:
        kwargs: dict = {"region": self.region or "us-east-1"}
        if self.endpoint_url:
            parsed = urlparse(self.endpoint_url if "://" in self.endpoint_url else f"http://{self.endpoint_url}")
            kwargs["endpoint_override"] = parsed.netloc
            kwargs["scheme"] = parsed.scheme
        if self.access_key:
            kwargs.update(access_key=self.access_key, secret_key=self.secret_key,
                          session_token=self.session_token)
        return pafs.S3FileSystem(**kwargs)

    def boto3_client(self):
        """A boto3 S3 client with the same settings: for the conditional writes pyarrow lacks."""
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint_url if not self.endpoint_url or "://" in self.endpoint_url
                            else f"http://{self.endpoint_url}", region_name=self.region or "us-east-1",
                            aws_access_key_id=self.access_key, aws_secret_access_key=self.secret_key,
                            aws_session_token=self.session_token)

    def resolve(self, uri: str) -> tuple[pafs.FileSystem, str]:
        """The filesystem for `uri` and the path to use with it."""
        if is_s3(uri):
            return self.s3(), uri[len("s3://"):].rstrip("/")
        return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri))


def join(uri: str, *parts: str) -> str:
    return "/".join([uri.rstrip("/"), *parts])



def write_atomic(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    """`data` appears under `path` whole or not at all.

    Locally it is written under a hidden temporary name in the same directory and
    renamed, so a killed process or a full disk never leaves a partial file under
    the final name; on S3 an object exists only once its single PUT (or a completed
    multipart upload) succeeded.
    """
    if not isinstance(fs, pafs.LocalFileSystem):
        with fs.open_output_stream(path) as f:
            f.write(data)
        return
    head, _, name = path.rpartition("/")
    tmp = f"{head}/.{name}.{uuid.uuid4().hex[:12]}.tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
