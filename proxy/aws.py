"""AWS Signature Version 4 for Bedrock, with the proxy's own credentials, through botocore.

A SigV4 signature is bound to the host it was made for, so a client's cannot be forwarded: the proxy
drops it and signs every Bedrock request it forwards itself. The credentials come from the settings
(`AWS_ACCESS_KEY_ID` and `AWS_SECRET_ACCESS_KEY`, with `AWS_SESSION_TOKEN`), else from botocore's own
chain (`AWS_PROFILE`, the shared credentials and config files, container and instance roles).

botocore is imported where it is used, so that only a proxy configured for Bedrock pays for it: most of
a second of start-up.
"""

from __future__ import annotations

import logging
from typing import Any

import anyio

from proxy.errors import ProxyError
from proxy.headers import Headers
from proxy.settings import Settings

logger = logging.getLogger("openai_proxy")
# botocore logs each canonical request at DEBUG, the session token's header among them: never ours.
logging.getLogger("botocore").setLevel(logging.WARNING)

SERVICE = "bedrock"


class AwsSigner:
    """Signs Bedrock requests once `prepare` found credentials; `ready` says whether it did."""

    def __init__(self, settings: Settings) -> None:
        self.region = settings.aws_region
        self._wanted = bool(settings.aws_region or settings.bedrock_base_url)
        self._profile = settings.aws_profile
        self._credentials: Any = None
        if settings.aws_access_key_id and settings.aws_secret_access_key:
            from botocore.credentials import Credentials

            token = settings.aws_session_token.get_secret_value() if settings.aws_session_token else None
            key_id, secret = settings.aws_access_key_id.get_secret_value(), settings.aws_secret_access_key
            self._credentials = Credentials(key_id, secret.get_secret_value(), token, method="settings")

    @property
    def ready(self) -> bool:
        return self._credentials is not None and self.region is not None

    async def prepare(self) -> None:
        """Look the credentials up (botocore's chain may ask an instance's metadata service: in a thread),
        when Bedrock is configured at all."""
        if not self._wanted or self._credentials is not None:
            self._report()
            return
        from botocore.exceptions import BotoCoreError

        try:
            self._credentials = await anyio.to_thread.run_sync(self._look_up)
        except BotoCoreError as exc:
            logger.warning("AWS credentials could not be read for Bedrock: %s", type(exc).__name__)
        self._report()

    def _look_up(self) -> Any:
        from botocore.session import Session

        return Session(profile=self._profile).get_credentials()

    def _report(self) -> None:
        if not self._wanted:
            return
        if self._credentials is None:
            logger.warning(
                "no AWS credentials for Bedrock: its requests are forwarded only with a client's Bedrock API key"
                " (Authorization: Bearer); set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE"
            )
        elif self.region is None:
            logger.warning("Bedrock requests cannot be signed without AWS_REGION")
        else:
            logger.info("Bedrock requests are signed with AWS credentials from %s", self._credentials.method)

    async def sign(self, method: str, url: str, headers: Headers, body: bytes) -> Headers:
        """`headers` with the proxy's SigV4 signature of the request added."""
        if not self.ready:
            raise missing_credentials()
        from botocore.auth import SigV4Auth
        from botocore.awsrequest import AWSRequest
        from botocore.exceptions import BotoCoreError

        credentials = self._credentials
        try:
            if getattr(credentials, "refresh_needed", lambda: False)():  # a role's: refreshed over the network
                frozen = await anyio.to_thread.run_sync(credentials.get_frozen_credentials)
            else:
                frozen = credentials.get_frozen_credentials()
        except BotoCoreError as exc:
            logger.warning("refreshing the AWS credentials for Bedrock failed: %s", exc)
            raise ProxyError(
                503,
                f"The proxy's AWS credentials could not be refreshed ({type(exc).__name__}); see its log.",
                "provider_not_configured",
                error_type="configuration_error",
            ) from exc

        request = AWSRequest(method=method, url=url, data=body, headers=dict(headers))
        SigV4Auth(frozen, SERVICE, self.region).add_auth(request)
        return list(request.headers.items())


def missing_credentials() -> ProxyError:
    return ProxyError(
        503,
        "The proxy holds no AWS credentials to sign Bedrock requests with (a client's signature is bound to"
        " another host): set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) and AWS_REGION, or"
        " send a Bedrock API key as Authorization: Bearer.",
        "provider_not_configured",
        error_type="configuration_error",
    )
