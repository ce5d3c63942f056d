"""Signing Bedrock requests with the proxy's AWS credentials (proxy/aws.py)."""

from __future__ import annotations

from typing import Any

import pytest
from botocore.exceptions import CredentialRetrievalError

from proxy.aws import AwsSigner
from proxy.errors import ProxyError
from proxy.settings import Settings

pytestmark = pytest.mark.anyio
URL = "https://bedrock-runtime.eu-west-1.amazonaws.com/model/m:0/converse"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def signer(**settings: Any) -> AwsSigner:
    return AwsSigner(Settings(_env_file=None, aws_region="eu-west-1", **settings))  # type: ignore[call-arg]


async def test_a_request_is_signed_with_the_proxys_key_for_its_region() -> None:
    aws = signer(aws_access_key_id="AKIAEXAMPLE", aws_secret_access_key="secret", aws_session_token="token")
    await aws.prepare()
    assert aws.ready
    headers = dict(await aws.sign("POST", URL, [("content-type", "application/json")], b"{}"))
    assert headers["Authorization"].startswith("AWS4-HMAC-SHA256 Credential=AKIAEXAMPLE/")
    assert "/eu-west-1/bedrock/aws4_request" in headers["Authorization"]
    assert headers["X-Amz-Security-Token"] == "token" and "X-Amz-Date" in headers
    assert headers["content-type"] == "application/json"


async def test_without_credentials_signing_answers_an_error_naming_the_settings() -> None:
    aws = signer()
    await aws.prepare()  # the tests' environment has no AWS files and no instance metadata (conftest)
    assert not aws.ready
    with pytest.raises(ProxyError) as raised:
        await aws.sign("POST", URL, [], b"{}")
    assert raised.value.status == 503 and "AWS_ACCESS_KEY_ID" in raised.value.message


async def test_credentials_that_cannot_be_refreshed_answer_an_error_not_a_crash() -> None:
    class Expiring:
        method = "assume-role"

        def refresh_needed(self) -> bool:
            return True

        def get_frozen_credentials(self) -> Any:
            raise CredentialRetrievalError(provider="assume-role", error_msg="the role is gone")

    aws = signer()
    aws._credentials = Expiring()
    with pytest.raises(ProxyError) as raised:
        await aws.sign("POST", URL, [], b"{}")
    assert raised.value.status == 503 and "could not be refreshed" in raised.value.message


async def test_a_profile_that_does_not_exist_leaves_bedrock_unsigned_and_says_so(
    caplog: pytest.LogCaptureFixture,
) -> None:
    aws = signer(aws_profile="no-such-profile")
    await aws.prepare()
    assert not aws.ready
    messages = [record.getMessage() for record in caplog.records]
    assert any("AWS credentials could not be read for Bedrock: ProfileNotFound" in message for message in messages)
    assert any("no AWS credentials for Bedrock" in message for message in messages)
