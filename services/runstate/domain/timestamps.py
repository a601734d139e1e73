"""UTC datetimes that serialise the way Prefect's API does.

Prefect answers with `2023-11-07T05:31:56Z` (no fraction when it is zero) and
`2023-11-07T05:31:56.120000Z` otherwise. Replaying a recorded decision bit for bit
needs the microseconds, so they are always kept when present.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

from pydantic import AfterValidator

UTC = UTC


def as_utc(value: datetime) -> datetime:
    # Naive datetimes come from clients that mean UTC; aware ones are converted so that
    # equality and ordering never depend on the offset a writer happened to use.
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    try:
        return value.astimezone(UTC)
    except OverflowError:
        # A ValueError is what pydantic reports as a validation error of the field.
        raise ValueError(f"{value.isoformat()} is outside the years 1-9999 in UTC") from None


# No serializer of our own: for a UTC value pydantic's native one already writes `Z`, with the
# fraction only when non-zero, as Prefect does.
UtcDateTime = Annotated[datetime, AfterValidator(as_utc)]
