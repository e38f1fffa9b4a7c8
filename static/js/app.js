// Countersign dashboard: the little the server cannot do. No inline scripts anywhere (strict CSP).
// - keep document.title in step with the OOB-swapped #pending-count;
// - show the websocket's state (the ws extension reconnects; the server resyncs on open);
// - refresh relative times; show notices for refused requests; dismiss notices.
(function () {
  "use strict";

  var NOTICE_MS = 12000;

  function syncTitle() {
    var count = document.getElementById("pending-count");
    var base = document.body.getAttribute("data-title") || "Countersign";
    var n = count ? parseInt(count.getAttribute("data-count"), 10) || 0 : 0;
    document.title = n > 0 ? "(" + n + ") " + base : base;
  }

  function setLive(state, label) {
    var el = document.getElementById("live-status");
    if (el) {
      el.setAttribute("data-live", state);
      el.textContent = label;
    }
  }

  function span(seconds) {
    seconds = Math.floor(Math.abs(seconds));
    if (seconds < 60) return seconds + " s";
    if (seconds < 3600) return Math.floor(seconds / 60) + " min";
    if (seconds < 86400) {
      var m = Math.floor((seconds % 3600) / 60);
      return Math.floor(seconds / 3600) + " h " + (m < 10 ? "0" : "") + m + " min";
    }
    return Math.floor(seconds / 86400) + " d " + Math.floor((seconds % 86400) / 3600) + " h";
  }

  function refreshTimes() {
    var now = Date.now();
    document.querySelectorAll("time[data-relative]").forEach(function (el) {
      var at = Date.parse(el.getAttribute("datetime"));
      if (isNaN(at)) return;
      var seconds = (at - now) / 1000;
      if (el.getAttribute("data-relative") === "ago") {
        el.textContent = -seconds < 10 ? "just now" : span(seconds) + " ago";
      } else {
        el.textContent = seconds <= 0 ? "expired" : span(seconds) + " left";
      }
    });
  }

  function dismissLater(notice) {
    if (notice.classList.contains("notice-error")) return; // errors stay until clicked
    window.setTimeout(function () { notice.remove(); }, NOTICE_MS);
  }

  function notify(message) {
    var box = document.getElementById("notices");
    if (!box) return;
    var notice = document.createElement("div");
    notice.className = "notice notice-error";
    notice.setAttribute("role", "alert");
    notice.textContent = message;
    box.prepend(notice);
  }

  document.addEventListener("DOMContentLoaded", function () {
    syncTitle();
    document.querySelectorAll("#notices .notice").forEach(dismissLater);
    var box = document.getElementById("notices");
    if (box) {
      new MutationObserver(function (records) {
        records.forEach(function (record) {
          record.addedNodes.forEach(function (node) {
            if (node.nodeType === 1 && node.classList.contains("notice")) dismissLater(node);
          });
        });
      }).observe(box, { childList: true });
      box.addEventListener("click", function (event) {
        var notice = event.target.closest(".notice");
        if (notice && event.target.tagName !== "A") notice.remove();
      });
    }
    window.setInterval(refreshTimes, 30000);
  });

  document.addEventListener("htmx:wsConnecting", function () { setLive("connecting", "Connecting…"); });
  document.addEventListener("htmx:wsOpen", function () { setLive("open", "Live"); });
  document.addEventListener("htmx:wsClose", function () { setLive("offline", "Reconnecting…"); });
  // The first message after an open is the server's full resync: from then on the page is live.
  document.addEventListener("htmx:wsAfterMessage", function () {
    setLive("live", "Live");
    syncTitle();
  });
  document.addEventListener("htmx:afterSettle", syncTitle);
  document.addEventListener("htmx:oobAfterSwap", syncTitle);

  document.addEventListener("htmx:responseError", function (event) {
    var status = event.detail.xhr ? event.detail.xhr.status : 0;
    var message = status === 400
      ? "The request was refused (its security token is missing or stale). Reload the page and try again."
      : status === 401
        ? "Your session has ended. Log in again."
        : "The server could not complete this request (" + status + "). Nothing was changed; try again.";
    notify(message);
  });
  document.addEventListener("htmx:sendError", function () {
    notify("The server could not be reached. Nothing was changed; try again.");
  });
})();
