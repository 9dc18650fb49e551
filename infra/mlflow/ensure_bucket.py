"""Create the S3 bucket for MLflow artefacts if it is missing, waiting for the endpoint to come up.

Runs as the init container of the MLflow Deployment (infra/mlflow/k8s/mlflow.yaml): the server's
``--artifacts-destination s3://<bucket>`` fails on first upload when the bucket does not exist, and a fresh
MinIO has none. Reads MLFLOW_S3_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and ARTIFACT_BUCKET.
"""

from __future__ import annotations

import os
import sys
import time


def ensure_bucket(endpoint: str, bucket: str, attempts: int = 60, delay_s: float = 5.0) -> bool:
    """Create ``bucket`` at ``endpoint`` unless it exists; returns True when it was created."""
    import boto3
    from botocore.exceptions import ClientError, EndpointConnectionError

    s3 = boto3.client("s3", endpoint_url=endpoint)
    for attempt in range(1, attempts + 1):
        try:
            existing = {b["Name"] for b in s3.list_buckets().get("Buckets", [])}
            if bucket in existing:
                return False
            s3.create_bucket(Bucket=bucket)
            return True
        except (EndpointConnectionError, ClientError) as err:
            # MinIO answers 503 / refuses connections while it starts; credentials errors repeat forever,
            # so the last one is raised below with the endpoint named.
            if attempt == attempts:
                raise RuntimeError(f"cannot create bucket {bucket!r} at {endpoint}: {err}") from err
            time.sleep(delay_s)
    return False


def main() -> int:
    missing = [k for k in ("MLFLOW_S3_ENDPOINT_URL", "ARTIFACT_BUCKET", "AWS_ACCESS_KEY_ID",
                           "AWS_SECRET_ACCESS_KEY") if not os.environ.get(k)]
    if missing:
        print(f"ensure_bucket: missing environment variables: {', '.join(missing)}", file=sys.stderr)
        return 2
    created = ensure_bucket(os.environ["MLFLOW_S3_ENDPOINT_URL"], os.environ["ARTIFACT_BUCKET"])
    print(f"bucket {os.environ['ARTIFACT_BUCKET']}: {'created' if created else 'exists'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
