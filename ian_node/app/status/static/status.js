// ian-node status page: polls /ui/live and swaps the sections whose rendering changed.
// No framework, no external script; works without JavaScript too (the page is rendered server-side).
(function () {
  "use strict";
  const body = document.body;
  const url = body.dataset.liveUrl;
  const indicator = document.getElementById("live-indicator");
  const period = 1000 * Number(body.dataset.pollS || 3);

  function markPicture(img) {
    const figure = img.closest("figure");
    if (figure) figure.classList.add("unavailable");
  }
  // Pictures that cannot be drawn (e.g. the source was purged) show a placeholder, not a broken image.
  document.addEventListener("error", function (event) {
    const target = event.target;
    if (target instanceof HTMLImageElement && target.dataset.picture) markPicture(target);
  }, true);
  document.querySelectorAll("img[data-picture]").forEach(function (img) {
    if (img.complete && img.naturalWidth === 0) markPicture(img);
  });

  function show(state, text) {
    if (!indicator) return;
    indicator.dataset.state = state;
    indicator.querySelector(".live-text").textContent = text;
  }

  async function poll() {
    try {
      const response = await fetch(url, {credentials: "same-origin", cache: "no-store",
                                         headers: {"Accept": "application/json"}});
      if (response.status === 401) {
        window.location.assign("/login?next=" + encodeURIComponent(window.location.pathname));
        return;
      }
      if (!response.ok) throw new Error("HTTP " + response.status);
      const data = await response.json();
      for (const [name, section] of Object.entries(data.sections)) {
        const element = document.querySelector('[data-live="' + name + '"]');
        if (element && element.dataset.hash !== section.hash) {
          element.innerHTML = section.html;
          element.dataset.hash = section.hash;
        }
      }
      show("ok", "live · " + new Date(data.time * 1000).toLocaleTimeString());
    } catch (error) {
      show("lost", "connection lost, retrying");
    }
    window.setTimeout(poll, period);
  }
  if (url) window.setTimeout(poll, 0);
})();
