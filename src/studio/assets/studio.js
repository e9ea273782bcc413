// workflow-db studio: live updates of an execution page. The server pushes
// the page's live part, rendered and escaped, as server-sent events; this
// swaps it in. Nothing else on the pages needs script.
(function () {
  "use strict";
  var live = document.getElementById("live");
  if (!live || !window.EventSource) {
    return;
  }
  var source = new EventSource(live.getAttribute("data-live-url"));
  var state = function (s) {
    live.setAttribute("data-live-state", s);
  };
  source.addEventListener("open", function () {
    state("open");
  });
  source.addEventListener("update", function (event) {
    live.innerHTML = event.data;
    state("open");
  });
  source.addEventListener("error", function () {
    // EventSource reconnects by itself; the first update after it brings
    // the page up to date.
    state(source.readyState === EventSource.CLOSED ? "closed" : "reconnecting");
  });
})();
