"""`RatingClient`: the rating server's JSON API from Python (a simulated rater, a script).

It speaks to the same routes as the page, so a simulated rater exercises
exactly what a person's browser does. Standard library only.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable
from typing import Any

from ouroboros_jax.rate.items import Item


class RatingAPIError(Exception):
    """The server answered with an error: `status`, its `message` and the `field` it names."""

    def __init__(self, status: int, message: str, field: str | None = None):
        super().__init__(f"HTTP {status}: {message}")
        self.status, self.message, self.field = status, message, field


class RatingClient:
    """A client of a rating server at `url` (``http://host:port``), sending `token` as a bearer token."""

    def __init__(self, url: str, token: str | None = None, *, timeout_s: float = 10.0):
        self.url = url.rstrip("/")
        self.token = token
        self.timeout_s = timeout_s

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        headers = {"Accept": "application/json"}
        data = None
        if body is not None:
            headers["Content-Type"] = "application/json"
            data = json.dumps(body, allow_nan=False).encode("utf-8")
        if self.token is not None:
            headers["Authorization"] = f"Bearer {self.token}"
        request = urllib.request.Request(self.url + path, data=data, headers=headers, method=method)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                return json.loads(response.read().decode("utf-8"))
        except urllib.error.HTTPError as e:
            raw = e.read()
            try:
                error = json.loads(raw.decode("utf-8"))
                message, field = error["error"], error.get("field")
            except (ValueError, KeyError, TypeError):
                message, field = raw.decode("utf-8", "replace")[:200] or e.reason, None
            raise RatingAPIError(e.code, message, field) from None

    def next_item(self, rater: str) -> Item | None:
        """The item the queue serves `rater` next (highest priority first), or None."""
        data = self._call("GET", "/api/next?" + urllib.parse.urlencode({"rater": rater}))
        return None if data["item"] is None else Item.from_json(data["item"])

    def get_item(self, item_id: int) -> Item:
        return Item.from_json(self._call("GET", f"/api/items/{int(item_id)}"))

    def rate(self, item_id: int, rater: str, *, choice: int | None = None,
             scores: Iterable[float] | None = None, skip: bool = False,
             order: Iterable[int] | None = None) -> dict[str, Any]:
        """Post one rating (exactly one of `choice`, `scores`, `skip`); returns the stored rating as JSON.

        Raises:
          RatingAPIError: 400 malformed, 404 unknown item, 409 already rated by `rater`, 401 bad token.
        """
        body: dict[str, Any] = {"item_id": item_id, "rater": rater}
        if choice is not None:
            body["choice"] = choice
        if scores is not None:
            body["scores"] = list(scores)
        if skip:
            body["skip"] = True
        if order is not None:
            body["order"] = list(order)
        return self._call("POST", "/api/ratings", body)["rating"]

    def counts(self, rater: str | None = None) -> dict[str, Any]:
        """The queue's counts (`store.QueueCounts` as JSON)."""
        query = "" if rater is None else "?" + urllib.parse.urlencode({"rater": rater})
        return self._call("GET", "/api/counts" + query)


def run_rater(client: RatingClient, rater: str, decide: Callable[[Item], dict[str, Any]], *,
              limit: int | None = None) -> int:
    """Rate items through the API as `rater` until the queue has none left for it (or `limit` ratings).

    `decide(item)` returns the rating's fields, e.g. ``{"choice": 1}``,
    ``{"scores": [4]}`` or ``{"skip": True}``; a simulated rater is a `decide`
    that reads the gold label (from `item.metadata` or the producer's data) and adds noise.
    Returns the number of ratings posted.
    """
    posted = 0
    while limit is None or posted < limit:
        item = client.next_item(rater)
        if item is None:
            break
        client.rate(item.id, rater, **decide(item))
        posted += 1
    return posted
