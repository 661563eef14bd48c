// Drag a result from the gallery back into the input images.
//
// A browser drag that starts on an <img> carries the image's URL (text/uri-list, text/html),
// not a file, and Gradio's upload takes files only: such a drop did nothing. On a drop onto
// the input images, this script turns a URL of one of this app's own served files (same
// origin, /gradio_api/file=...) into a File and hands it to the input's own file <input>, so
// Gradio uploads it into its cache like any other upload. Any other URL is refused with a
// message under the input. A file dropped on an input that already holds images (where
// Gradio has no drop zone) goes the same way.
(() => {
  "use strict";
  const ZONE = "#input-images";
  const MESSAGE_ID = "input-drop-message";
  const OWN_FILES = "/gradio_api/file=";

  const zoneOf = (event) => (event.target instanceof Element ? event.target.closest(ZONE) : null);

  // The URL a drag carries: the first of its uri-list, else an <img> in its HTML, else its
  // text if that is a URL.
  function droppedUrl(data) {
    const uris = (data.getData("text/uri-list") || "")
      .split(/\r?\n/)
      .map((line) => line.trim())
      .filter((line) => line && !line.startsWith("#"));
    if (uris.length) return uris[0];
    const html = data.getData("text/html");
    if (html) {
      const img = new DOMParser().parseFromString(html, "text/html").querySelector("img[src]");
      if (img) return img.getAttribute("src");
    }
    const text = (data.getData("text/plain") || "").trim();
    return /^(https?:\/\/|\/)\S+$/i.test(text) ? text : null;
  }

  // The URL when it names a file this app serves (same origin, Gradio's file route), else null.
  function ownFile(raw) {
    let url;
    try {
      url = new URL(raw, window.location.href);
    } catch {
      return null;
    }
    return url.origin === window.location.origin && url.pathname.includes(OWN_FILES) ? url : null;
  }

  // Why `raw` is not taken, for the message.
  function refused(raw) {
    try {
      const url = new URL(raw, window.location.href);
      if (url.origin === window.location.origin) return `${url.pathname} is not one of its files`;
      return `this one is from ${url.host || url.protocol.replace(":", " data")}`;
    } catch {
      return "this one is not a link to a file";
    }
  }

  function say(zone, text) {
    let box = document.getElementById(MESSAGE_ID);
    if (!box && text) {
      box = document.createElement("p");
      box.id = MESSAGE_ID;
      box.className = "lvs-msg lvs-drop-msg";
      box.setAttribute("role", "alert");
      zone.insertAdjacentElement("afterend", box);
    }
    if (box) {
      box.textContent = text;
      box.hidden = !text;
    }
  }

  // Through the component's own upload: its file <input> and a change event, as a picked file.
  function upload(zone, files) {
    const input = zone.querySelector("input[type=file]");
    if (!input) {
      say(zone, "This input takes no image now (choose a model that takes input images).");
      return;
    }
    const list = new DataTransfer();
    for (const file of files) list.items.add(file);
    input.files = list.files;
    input.dispatchEvent(new Event("change", { bubbles: true }));
    say(zone, "");
  }

  async function fetchInto(zone, raw) {
    const url = ownFile(raw);
    if (!url) {
      say(zone, `Only this app's own images can be dropped here; ${refused(raw)}. Save the image and upload the file, or paste it.`);
      return;
    }
    let blob;
    try {
      const response = await fetch(url.href, { credentials: "same-origin" });
      if (!response.ok) throw new Error(`HTTP ${response.status}`);
      blob = await response.blob();
    } catch (error) {
      say(zone, `Could not read the dropped image (${error.message}): use "Use result as input", or upload the file.`);
      return;
    }
    if (!blob.type.startsWith("image/")) {
      say(zone, `The dropped link is not an image (${blob.type || "unknown type"}).`);
      return;
    }
    const name = decodeURIComponent(url.pathname.split("/").pop() || "") || "result.png";
    upload(zone, [new File([blob], name, { type: blob.type })]);
  }

  // The drop must be allowed wherever it lands in the input (Gradio allows it only on its empty
  // upload area), or the browser navigates to the dragged URL.
  document.addEventListener(
    "dragover",
    (event) => {
      if (zoneOf(event) && event.dataTransfer) {
        event.preventDefault();
        event.dataTransfer.dropEffect = "copy";
      }
    },
    true,
  );

  // A URL: fetched and uploaded. Not stopped, so Gradio's own drop handler still ends its drag
  // highlight (it finds no file and loads nothing).
  document.addEventListener(
    "drop",
    (event) => {
      const zone = zoneOf(event);
      const data = event.dataTransfer;
      if (!zone || !data || data.files.length) return;
      const raw = droppedUrl(data);
      if (!raw) return;
      event.preventDefault();
      fetchInto(zone, raw);
    },
    true,
  );

  // A file that no Gradio drop zone took (the input already holds images): uploaded the same way.
  document.addEventListener("drop", (event) => {
    const zone = zoneOf(event);
    const data = event.dataTransfer;
    if (!zone || !data || !data.files.length || event.defaultPrevented) return;
    event.preventDefault();
    upload(zone, Array.from(data.files));
  });
})();
