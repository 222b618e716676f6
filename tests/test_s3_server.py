"""The S3 fixture itself: a real SeaweedFS answering boto3 on loopback only."""

from __future__ import annotations


def test_seaweed_round_trip(s3_server) -> None:
    """Objects written through boto3 come back with an MD5 ETag; the endpoint is loopback."""
    assert s3_server.endpoint.startswith("http://127.0.0.1:")
    s3 = s3_server.client()
    s3.create_bucket(Bucket="fixture-check")
    s3.put_object(Bucket="fixture-check", Key="a/b.bin", Body=b"hello")
    listed = s3.list_objects_v2(Bucket="fixture-check")["Contents"]
    assert [o["Key"] for o in listed] == ["a/b.bin"]
    assert listed[0]["ETag"] == '"5d41402abc4b2a76b9719d911017c592"'
