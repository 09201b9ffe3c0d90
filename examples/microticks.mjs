// The tracker as an ES module: import Microticks from "./microticks.mjs";
import "./microticks.js";

export default globalThis.Microticks;
