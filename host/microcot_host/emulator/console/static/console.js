// microcot console: live regions over Server-Sent Events. The server sends `region` events with
// {target, html}: the element with that id gets the new HTML (the server rendered it with the
// same template as the page). Rows whose status changed, and new rows, light up for a moment.
(function () {
  "use strict";
  var url = document.body.dataset.live;
  var state = document.getElementById("live-state");
  if (!url || !window.EventSource) { return; }

  function show(text, cls) {
    if (!state) { return; }
    state.textContent = text;
    state.className = "live-state " + cls;
  }

  function keyed(root) {
    // rows that carry an id (data-op, data-request, data-alarm, data-device): id -> status
    var out = {};
    root.querySelectorAll("tr[data-op], tr[data-request], tr[data-alarm], tr[data-device], tr[data-event]")
      .forEach(function (tr) {
        var id = tr.dataset.op || tr.dataset.request || tr.dataset.alarm || tr.dataset.device || tr.dataset.event;
        out[id] = tr.dataset.status || tr.textContent;
      });
    return out;
  }

  function apply(target, html) {
    var el = document.getElementById(target);
    if (!el) { return; }
    var before = keyed(el);
    var hadRows = Object.keys(before).length > 0 || el.children.length > 0;
    el.innerHTML = html;
    if (!hadRows) { return; }
    el.querySelectorAll("tr[data-op], tr[data-request], tr[data-alarm], tr[data-device], tr[data-event]")
      .forEach(function (tr) {
        var id = tr.dataset.op || tr.dataset.request || tr.dataset.alarm || tr.dataset.device || tr.dataset.event;
        var now = tr.dataset.status || tr.textContent;
        if (before[id] !== now) { tr.classList.add("changed"); }
      });
    el.querySelectorAll("circle.newest").forEach(function (c) { c.classList.add("changed"); });
  }

  var es = new EventSource(url);
  es.addEventListener("open", function () { show("live", "on"); });
  es.addEventListener("error", function () {
    show(es.readyState === EventSource.CLOSED ? "offline: reload the page" : "reconnecting", "off");
  });
  es.addEventListener("region", function (ev) {
    var d = JSON.parse(ev.data);
    apply(d.target, d.html);
    document.body.dataset.updates = String(Number(document.body.dataset.updates || 0) + 1);
  });
  es.addEventListener("bye", function (ev) {
    es.close();
    var d = JSON.parse(ev.data);
    show(d.reason === "logged out" ? "logged out" : "offline: reload the page", "off");
  });
  window.addEventListener("pagehide", function () { es.close(); });
})();
