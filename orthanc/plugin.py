"""Orthanc Python plugin: when an MR series becomes stable, have ian-node segment it.

Runs inside Debian's Orthanc with its embedded Python and no virtual environment, so it imports only
the standard library and `orthanc`. Settings come from the "IanNode" section of Orthanc's
configuration (every key is documented in docs/orthanc.md; example in orthanc/orthanc.json):

- "Mode": "push" sends the series to the node by C-STORE (`/modalities/{Modality}/store`, as an
  asynchronous Orthanc job that the plugin's worker thread then follows to its end); "pull" POSTs
  the node's HTTP trigger with the Orthanc series ID, and the node fetches the instances through
  Orthanc's REST API and uploads the SEG back.
- "Modality": the DicomModalities entry of the node (push).
- "NodeUrl", "NodeToken": the node's HTTP API and its optional bearer token (pull).
- "Modalities" (default ["MR"]), "SeriesDescriptionPattern" (default "", matches all; searched
  case-insensitively), "MinInstances" (default 1): which stable series are sent.
- "TimeoutSeconds" (default 300): how long one pull request, or one push job, may take.

The change callback only enqueues; a worker thread does the REST calls, as the Orthanc book advises,
so Orthanc is never blocked. Only MR image series are ever sent, so the SEG the node sends back
(modality SEG) never triggers anything. A series is sent once per distinct instance set: after a
confirmed send the fingerprint of its instances is kept in the series' metadata (the "UserMetadata"
entry "IanNodeTriggered" must be declared), so a series that stabilises again unchanged is not sent
twice. Failures are logged with the series ID and leave no fingerprint, and
`POST /ian-node/series/{id}/segment` re-triggers a series by hand (sent even if unchanged).
"""

import hashlib
import json
import queue
import re
import threading
import time
import urllib.error
import urllib.request

import orthanc

SECTION = "IanNode"
#: User metadata slot that records the fingerprint of the instance set last sent.
METADATA = "IanNodeTriggered"
#: SOP classes the node segments: MR Image Storage and Enhanced MR Image Storage.
IMAGE_SOP_CLASSES = {"1.2.840.10008.5.1.4.1.1.4", "1.2.840.10008.5.1.4.1.1.4.1"}
_STOP = object()


class NotSelected(Exception):
    """A series the rules do not send; the message says why."""


class SendFailed(Exception):
    """The node did not get the series; the message says what happened."""


def _settings():
    config = json.loads(orthanc.GetConfiguration())
    section = config.get(SECTION, {})
    mode = section.get("Mode", "push")
    if mode not in ("push", "pull"):
        raise ValueError(f'IanNode.Mode must be "push" or "pull", got {mode!r}')
    if METADATA not in config.get("UserMetadata", {}):
        orthanc.LogError(f'ian-node: "UserMetadata" does not declare "{METADATA}": series cannot be marked as sent, '
                         "so unchanged series will be sent again")
    return {
        "mode": mode,
        "modality": section.get("Modality", "ian-node"),
        "node_url": section.get("NodeUrl", "http://127.0.0.1:8765").rstrip("/"),
        "node_token": section.get("NodeToken", ""),
        "modalities": set(section.get("Modalities", ["MR"])),
        "description": re.compile(section.get("SeriesDescriptionPattern", ""), re.IGNORECASE),
        "min_instances": int(section.get("MinInstances", 1)),
        "timeout": float(section.get("TimeoutSeconds", 300)),
    }


SETTINGS = _settings()
_jobs = queue.Queue()


def _get_json(uri):
    return json.loads(orthanc.RestApiGet(uri))


def _fingerprint(instance_ids):
    return hashlib.sha256("\n".join(sorted(instance_ids)).encode()).hexdigest()


def selected_instances(series_id):
    """The instance IDs of a series the rules select; NotSelected says why not."""
    series = _get_json(f"/series/{series_id}")
    tags = series.get("MainDicomTags", {})
    modality = tags.get("Modality", "")
    if modality not in SETTINGS["modalities"]:
        raise NotSelected(f"modality {modality!r} not selected")
    if not SETTINGS["description"].search(tags.get("SeriesDescription", "")):
        raise NotSelected("series description does not match")
    instances = series.get("Instances", [])
    if len(instances) < SETTINGS["min_instances"]:
        raise NotSelected(f"{len(instances)} instances, fewer than {SETTINGS['min_instances']}")
    sop_class = orthanc.RestApiGet(f"/instances/{instances[0]}/metadata/SopClassUid").decode().strip()
    if sop_class not in IMAGE_SOP_CLASSES:
        raise NotSelected(f"SOP class {sop_class} is not an MR image")
    return instances


def _already_sent(series_id, fingerprint):
    try:
        return orthanc.RestApiGet(f"/series/{series_id}/metadata/{METADATA}").decode() == fingerprint
    except Exception:  # orthanc.OrthancException when the metadata is absent
        return False


def _push(series_id):
    """C-STORE through an asynchronous Orthanc job, followed here (in the worker thread) to its end."""
    body = {"Resources": [series_id], "Asynchronous": True, "Synchronous": False}
    answer = json.loads(orthanc.RestApiPost("/modalities/{}/store".format(SETTINGS["modality"]), json.dumps(body)))
    job_id = answer["ID"]
    deadline = time.monotonic() + SETTINGS["timeout"]
    while True:
        job = _get_json(f"/jobs/{job_id}")
        state = job.get("State")
        if state == "Success":
            return f"Orthanc job {job_id}"
        if state == "Failure":
            raise SendFailed("C-STORE job {} to modality {!r} failed: {}".format(
                job_id, SETTINGS["modality"], job.get("ErrorDescription") or job.get("ErrorCode")))
        if time.monotonic() > deadline:
            raise SendFailed("C-STORE job {} still {} after {:.0f} s".format(job_id, state, SETTINGS["timeout"]))
        time.sleep(0.2)


def _pull(series_id):
    """POST the node's trigger; it answers once the series is fetched and its job queued."""
    request = urllib.request.Request(
        SETTINGS["node_url"] + "/jobs",
        data=json.dumps({"source": "orthanc", "series": series_id}).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    if SETTINGS["node_token"]:
        request.add_header("Authorization", "Bearer " + SETTINGS["node_token"])
    try:
        with urllib.request.urlopen(request, timeout=SETTINGS["timeout"]) as response:
            answer = json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode("utf-8", "replace")[:300]
        raise SendFailed(f"node answered HTTP {exc.code}: {detail}") from exc
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise SendFailed(f"node unreachable at {SETTINGS['node_url']}: {reason}") from exc
    return f"node job {answer.get('id')}"


def process(series_id, force=False):
    """Send one series unless the rules skip it or it was already sent unchanged; returns a summary."""
    try:
        instances = selected_instances(series_id)
    except NotSelected as exc:
        orthanc.LogInfo(f"ian-node: series {series_id} not sent: {exc}")
        return {"series": series_id, "sent": False, "reason": str(exc)}
    fingerprint = _fingerprint(instances)
    if not force and _already_sent(series_id, fingerprint):
        orthanc.LogInfo(f"ian-node: series {series_id} not sent: already sent unchanged")
        return {"series": series_id, "sent": False, "reason": "already sent unchanged"}
    what = _push(series_id) if SETTINGS["mode"] == "push" else _pull(series_id)
    orthanc.RestApiPut(f"/series/{series_id}/metadata/{METADATA}", fingerprint)
    orthanc.LogWarning("ian-node: series {} sent ({} mode, {})".format(series_id, SETTINGS["mode"], what))
    return {"series": series_id, "sent": True, "detail": what}


def _worker():
    while True:
        item = _jobs.get()
        if item is _STOP:
            return
        series_id, force = item
        try:
            process(series_id, force)
        except SendFailed as exc:
            orthanc.LogError(f"ian-node: series {series_id} failed: {exc} (re-trigger: POST /ian-node/series/{series_id}/segment)")
        except Exception as exc:  # keep the worker alive whatever one series does
            orthanc.LogError(f"ian-node: series {series_id} failed: {type(exc).__name__}: {exc}")


def on_change(change_type, level, resource_id):
    """Only enqueue: never block Orthanc's callback."""
    if change_type == orthanc.ChangeType.STABLE_SERIES:
        _jobs.put((resource_id, False))
    elif change_type == orthanc.ChangeType.ORTHANC_STOPPED:
        _jobs.put(_STOP)


def _send_status(output, status, message):
    output.SendHttpStatus(status, message, len(message.encode("utf-8")))


def on_segment(output, uri, **request):
    """POST /ian-node/series/{id}/segment: queue a series to be sent even if unchanged.

    Answers at once: 200 {"queued": true} when the rules select the series, 409 with the reason when
    they do not, 404 when Orthanc has no such series. The outcome of the send goes to Orthanc's log.
    """
    if request["method"] != "POST":
        output.SendMethodNotAllowed("POST")
        return
    series_id = request["groups"][0]
    try:
        orthanc.RestApiGet(f"/series/{series_id}")
    except Exception:
        _send_status(output, 404, f"no series {series_id} in this Orthanc\n")
        return
    try:
        selected_instances(series_id)
    except NotSelected as exc:
        _send_status(output, 409, f"series {series_id} is not sent: {exc}\n")
        return
    _jobs.put((series_id, True))
    orthanc.LogWarning(f"ian-node: series {series_id} queued by the re-trigger route")
    output.AnswerBuffer(json.dumps({"series": series_id, "queued": True}), "application/json")


threading.Thread(target=_worker, name="ian-node-trigger", daemon=True).start()
orthanc.RegisterOnChangeCallback(on_change)
orthanc.RegisterRestCallback("/ian-node/series/([0-9a-f-]+)/segment", on_segment)
